"""``normbench profile`` (speed, bandwidth and memory of the norm layers) and
``normbench plot profile FILE`` (its figures). Both only parse, call :mod:`normbench.bench` or
:mod:`normbench.plots.profile`, and render."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

import click

from normbench.cli.model_options import check_model_options, model_options

@click.command()
@click.option("--norm", help="Norms, comma-separated: l2, l1, linf, top<k> (batch-norm), layernorm, rmsnorm, "
              "groupnorm and their Lp variants (l1-layernorm ...). Default: each shape group's own.")
@click.option("--impl", help="Implementations: torch, eager, analytic, paper and any other registered in "
              "normbench.bench.IMPLS. Default: all registered.")
@click.option("--dtype", help="Dtypes: fp32, bf16, fp16, fp64, fp8_e4m3, fp8_e5m2. Default: fp32,bf16.")
@click.option("--shape", help="Input shapes, e.g. 32x64x56x56,4096x1024 (instead of the default grid).")
@click.option("--preset", help="Shape presets: resnet50 (batch 32 and 256), resnet50-b32, resnet50-b256, "
              "transformer (4096 rows x 1k..16k hidden).")
@click.option("--pass", "pass_", help="Passes: fwd, bwd, fwd+bwd. Default: fwd,fwd+bwd.")
@click.option("--mode", help="Modes: train, eval. Default: train.")
@click.option("--memory-format", help="Memory formats: contiguous, channels_last. Default: contiguous.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cpu or cuda.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: torch's own setting). "
              "On a machine shared with other work, --threads 1 gives far steadier numbers.")
@click.option("--malloc", type=click.Choice(["steady", "system"]), default="steady", show_default=True,
              help="CPU runs: steady keeps freed memory mapped (glibc), so no timed call pays page faults that "
              "depend on earlier allocations; system leaves the C allocator as it is.")
@click.option("--quick", is_flag=True, help="A reduced grid that finishes in well under a minute (CI uses it).")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the results here as cells finish: "
              ".json, .jsonl or .csv.")
@click.option("--resume", is_flag=True, help="Keep the cells already in --output and run only the others "
              "(refused when the file was measured on another device, torch version, thread count or cache mode).")
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.option("--warm-cache", is_flag=True, help="Hot-cache timing: every repeat reuses inputs left in the cache by the "
              "call before (default: CPU inputs out of the last-level cache in every repeat, CUDA's L2 flushed).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement (one profiled call per cell).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@model_options
def profile(norm: str | None, impl: str | None, dtype: str | None, shape: str | None, preset: str | None,
            pass_: str | None, mode: str | None, memory_format: str | None, device: str, threads: int | None,
            malloc: str, quick: bool, output: str | None, resume: bool, force: bool, warm_cache: bool,
            no_memory: bool, quiet: bool, model: str | None, weights: str | None, model_input: str | None,
            input_shape: str | None, train: bool, max_elements: int | None) -> int:
    """How fast is each norm layer, per dtype and shape, forward and backward, against torch's own
    layer and against this device's copy bandwidth; and how much memory does it keep for backward?

    With no options runs a default grid (about a minute on a 2-core CPU) and prints one table per
    shape group: in each block of one shape, dtype and pass the fastest row comes first, and the
    bar shows how close each comes to the bandwidth limit.

    With --model, the grid is the model's own norm-layer shapes (one group per family, the
    memory format its layers saw), and the model's whole training step is timed as it is and
    converted (normbench.nn.convert) to each batch-norm dispersion of --norm (default l2,l1,linf).

    Under torchrun with more than one process each shape is a global batch shared by the ranks
    and the default grid is the synchronized batch-norms (sync: SyncLpBatchNorm; torch-sync:
    torch's SyncBatchNorm, CUDA only) beside analytic on each rank's share alone; rank 0 writes
    and prints, with the collectives, the bytes each rank sends and the time in communication.
    """
    from normbench.axes import resolve_device
    from normbench.bench import KEY_FIELDS, make_spec, run
    from normbench.bench.runner import prepare_allocator
    from normbench.results import RESUME_FIELDS, check_output_options, environment, open_results, schema_name

    from normbench import distributed
    from normbench.errors import UserError

    world = distributed.launched()
    if world > 1 and model is not None:
        raise UserError("--model does not run under torchrun: profile the model in one process "
                        "(its batch-norms' synchronization is measured on their shapes with --shape)")
    check_output_options(output, resume, force)
    check_model_options(model, weights=weights, model_input=model_input, input_shape=input_shape,
                        max_elements=max_elements)
    prepared, groups, left_out = None, None, []
    if model is not None:
        from normbench.axes import parse_shape
        from normbench.bench.spec import model_groups
        from normbench.models.prepare import capture_model, prepare_model

        if max_elements is not None:
            raise UserError("--max-elements applies to stability --model (profile keeps no tensors)")
        prepared = prepare_model(model, weights, model_input, None if input_shape is None else parse_shape(input_shape),
                                 resolve_device(device))
        shapes, formats, left_out = capture_model(prepared, train=train, max_elements=1).profile_shapes()
        if not shapes:
            raise UserError(f"--model {model}: no normalization layer to profile ({'; '.join(left_out[:3])})")
        groups = model_groups(model, shapes)
        if memory_format is None:
            memory_format = ",".join(formats)
    spec = make_spec(norm=norm, impl=impl, dtype=dtype, shape=shape, preset=preset, pass_=pass_, mode=mode,
                     memory_format=memory_format, device=device, quick=quick, measure_memory=not no_memory,
                     threads=threads, malloc=malloc, cache="warm" if warm_cache else "cold", groups=groups,
                     world=world)
    dev = resolve_device(spec.device)
    load = _load_average()

    def open_writer() -> Any:
        if not output:
            return None
        import torch

        env = environment(dev)
        env["threads"] = threads or torch.get_num_threads()
        env["load_average_1m"] = load
        env["malloc"] = prepare_allocator(spec, dev)
        env["cache"] = spec.cache
        env["world_size"] = world
        if world > 1:
            env["backend"] = distributed.backend()
        if dev == "cpu":
            from normbench.kernels.machine import last_level_cache_total

            env["last_level_cache_bytes"] = last_level_cache_total()
        return open_results(output, schema_name("profile"), env, KEY_FIELDS, resume=resume, force=force,
                            match=(*RESUME_FIELDS, "cache", "world_size"))

    if world == 1:
        writer = open_writer()
        skip = writer.has if writer else None
    else:
        distributed.init_from_env(dev)
        writer, skip = _main_writer(spec, dev, open_writer)
        if not distributed.is_main():  # times alongside rank 0, which writes and prints
            run(spec, skip=skip)
            distributed.finish()
            return 0

    cores = os.cpu_count() or 1
    if dev == "cpu" and load is not None and load > 0.5 * cores:
        click.echo(f"Note: this machine is busy (load {load:.1f} on {cores} cores): CPU timings will be noisy"
                   + ("" if threads == 1 else "; --threads 1 gives steadier ones") + ".", err=True)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    show = not quiet and sys.stderr.isatty()
    with Progress(TextColumn("[bold]profile[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err, disable=not show, transient=True) as bar:
        task = bar.add_task("copy bandwidth", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        records = run(spec, on_record=writer.write if writer else None, skip=skip, on_progress=progress)
        if prepared is not None:
            from normbench.axes import parse_norms
            from normbench.axes import split_list
            from normbench.bench.model_step import convert_impl, model_step_records
            from normbench.bench.runner import default_timer

            bar.update(task, description="model training step")
            steps = model_step_records(prepared.module, prepared.inputs, model, parse_norms(norm or "l2,l1,linf"), dev,
                                       spec.timing, default_timer(dev, "warm"),
                                       impl=convert_impl(None if impl is None else split_list(impl)))
            for r in steps:
                if writer and not writer.has(r):
                    writer.write(r)
            records += steps
    shown = writer.records if writer else records
    out = Console()
    if not out.is_terminal:  # a file or a pipe: no terminal width to respect
        out = Console(width=120)
    render([r for r in shown if r.get("kind") != "model_step"], out)
    render_ranks([r for r in shown if (r.get("world_size") or 1) > 1], out)
    render_model_steps([r for r in shown if r.get("kind") == "model_step"], out)
    for note in left_out:
        out.print(f"[yellow]not profiled:[/] {note}")
    if writer:
        click.echo(f"{len(records)} cells measured, {len(writer.records)} in {writer.path}", err=True)
    distributed.finish()
    from normbench.cli.outcome import finish

    return finish(shown)


def _main_writer(spec: Any, device: str, open_writer: Any) -> tuple[Any, Any]:
    """Under torchrun: (rank 0's results writer, None elsewhere; which cells to skip, the same on
    every rank). Rank 0 opens ``--output`` (only it has the file) and sends every rank the cells
    already in it (``--resume``), or the error that refused it, which every rank then raises: the
    ranks must run the same cells, and none may be left waiting for a rank that stopped."""
    from normbench.bench import KEY_FIELDS
    from normbench.distributed import finish, from_main
    from normbench.errors import UserError
    from normbench.results import record_key

    opened: list[Any] = [None]

    def on_main() -> tuple[str | None, set]:
        try:
            opened[0] = open_writer()
        except UserError as exc:
            return str(exc), set()
        w = opened[0]
        return None, {record_key(c.axes(), KEY_FIELDS) for c in spec.cells(device) if w is not None and w.has(c.axes())}

    error, done = from_main(on_main)
    if error is not None:
        finish()
        raise UserError(error)
    return opened[0], (lambda axes: record_key(axes, KEY_FIELDS) in done)


def _load_average() -> float | None:
    """The 1-minute load average (other work competing for the CPU), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _fmt_time_iqr(median: float, iqr: float | None) -> str:
    """``12.79 ±0.16 ms``: median and IQR in the median's unit."""
    scale, unit = (1.0, "s") if median >= 1 else (1e3, "ms") if median >= 1e-3 else (1e6, "µs")
    digits = 0 if unit == "µs" else 2
    spread = "" if iqr is None else f" ±{iqr * scale:.{digits}f}"
    return f"{median * scale:.{digits}f}{spread} {unit}"


def _fmt_mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _bar(fraction: float | None, width: int = 8) -> str:
    """A bar of ``fraction`` of the copy bandwidth, coloured by how close it comes."""
    if fraction is None:
        return "-"
    filled = max(0, min(width, round(fraction * width)))
    color = "green" if fraction >= 0.5 else "yellow" if fraction >= 0.2 else "red"
    over = "+" if fraction > 1 else " "
    return f"[{color}]{'█' * filled}[/][dim]{'·' * (width - filled)}[/]{over}{fraction * 100:4.0f}%"


def _fmt_speedup(value: float | None) -> str:
    if value is None:
        return "-"
    color = "green" if value >= 1.05 else "red" if value < 0.95 else ""
    return f"[{color}]{value:.2f}x[/]" if color else f"{value:.2f}x"


def render(records: Iterable[dict[str, Any]], console: Any) -> None:
    """One rich table per shape group. Rows come in blocks of one shape, dtype, pass, mode and
    memory format (a bold header row each), fastest first and marked; skipped and failed cells are
    listed under the table with their reasons."""
    from rich import box
    from rich.table import Table

    from normbench.bench.impls import reference_impl

    records = list(records)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r.get("group") or "results", []).append(r)
    for name, rows in groups.items():
        ok = [r for r in rows if r.get("status") == "ok"]
        bad = [r for r in rows if r.get("status") != "ok"]
        peaks = sorted(r["peak_gbps"] for r in ok if r.get("peak_gbps"))
        threads = sorted({r.get("threads") for r in rows if r.get("threads")})
        devices = sorted({r.get("device") for r in rows if r.get("device")})
        caches = sorted({r.get("cache") for r in ok if r.get("cache")})
        caption = (", ".join(devices)
                   + (f", {'/'.join(map(str, threads))} threads" if threads and devices == ["cpu"] else "")
                   + (f", {'/'.join(caches)} cache" if caches else "")
                   + (f"; copy bandwidth {peaks[len(peaks) // 2]:.1f} GB/s" if peaks else "")
                   + ". time: median ± IQR; GB/s: fewest bytes of the pass / time; "
                   "vs torch: torch's layer time / this time; saved: kept for backward")
        table = Table(title=f"[bold]{name}[/]", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        table.add_column("shape dtype pass / norm impl", no_wrap=True)  # block header rows, then cells
        table.add_column("time ± IQR", justify="right", no_wrap=True)
        table.add_column("GB/s", justify="right", no_wrap=True)
        table.add_column("of copy bandwidth", no_wrap=True)
        table.add_column("vs torch", justify="right", no_wrap=True)
        table.add_column("saved MiB", justify="right", no_wrap=True)
        table.add_column("peak MiB", justify="right", no_wrap=True)
        compiled = any(r.get("compile_time_s") is not None for r in ok)
        if compiled:  # only implementations that compile report it (their first call, apart)
            table.add_column("compile s", justify="right", no_wrap=True)
        blocks: dict[tuple, list[dict[str, Any]]] = {}
        for r in ok:
            key = (r.get("shape"), r.get("dtype"), r.get("pass"), r.get("mode"), r.get("memory_format"))
            blocks.setdefault(key, []).append(r)
        for (shp, dt, ps, md, fmt), block in blocks.items():
            block.sort(key=lambda r: r["time_median_s"])
            header = f"{shp}  {dt}  {ps}" + ("" if md == "train" else f"  {md}") + ("" if fmt == "contiguous" else f"  {fmt}")
            table.add_row(f"[bold]{header}[/]")
            for i, r in enumerate(block):
                name_cell = f"  {r['norm']} {r['impl']}"
                time_cell = _fmt_time_iqr(r["time_median_s"], r.get("time_iqr_s"))
                if i == 0:
                    name_cell = f"[bold green]▶ {r['norm']} {r['impl']}[/]"
                    time_cell = f"[bold green]{time_cell}[/]"
                cells = [
                    name_cell, time_cell,
                    "-" if r.get("gbps") is None else f"{r['gbps']:.1f}",
                    _bar(r.get("sol_fraction")),
                    "[dim]ref[/]" if r["impl"] == reference_impl(r.get("world_size") or 1)
                    else _fmt_speedup(r.get("speedup_vs_torch")),
                    _fmt_mb(r.get("saved_bytes")), _fmt_mb(r.get("peak_memory_bytes")),
                ]
                if compiled:
                    c = r.get("compile_time_s")
                    cells.append("-" if c is None else f"{c:.1f}")
                table.add_row(*cells, end_section=i == len(block) - 1)
        console.print(table)
        reasons: dict[tuple[str, str], set[str]] = {}
        for r in bad:
            reasons.setdefault((r.get("status", "?"), r.get("reason") or ""), set()).add(f"{r['norm']} {r['impl']}")
        for (status, reason), cells in reasons.items():
            color = "yellow" if status == "skipped" else "red"
            console.print(f"  [{color}]{status}[/] {', '.join(sorted(cells))}: {reason}")


def render_ranks(records: list[dict[str, Any]], console: Any) -> None:
    """Under torchrun: per cell, where rank 0's time went (inside the collectives, the wait for
    the other ranks included, and the rest), the collectives per call, the bytes each rank sends,
    and the slowest rank's median."""
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return
    from rich import box
    from rich.table import Table

    world = ok[0]["world_size"]
    table = Table(title=f"[bold]across {world} ranks[/]", box=box.SIMPLE_HEAD, pad_edge=False, caption_justify="left",
                  caption="shape: the global batch, shared by the ranks. comm: median time per call inside the "
                  "collectives (in calls apart from the timed ones); sent: bytes each rank sends per call with "
                  "ring algorithms; slowest: the largest median over the ranks")
    for col in ("shape dtype pass", "norm impl", "time", "comm", "compute", "collectives", "sent B", "slowest"):
        table.add_column(col, justify="left" if col in ("shape dtype pass", "norm impl") else "right", no_wrap=True)
    for r in ok:
        table.add_row(f"{r['shape']} {r['dtype']} {r['pass']}" + ("" if r["mode"] == "train" else f" {r['mode']}"),
                      f"{r['norm']} {r['impl']}", _fmt_time_iqr(r["time_median_s"], None),
                      "-" if r.get("comm_s") is None else _fmt_time_iqr(r["comm_s"], None),
                      "-" if r.get("compute_s") is None else _fmt_time_iqr(r["compute_s"], None),
                      str(r.get("collectives", "-")), "-" if r.get("sent_bytes") is None else f"{r['sent_bytes']:.0f}",
                      "-" if not r.get("rank_medians_s") else _fmt_time_iqr(max(r["rank_medians_s"]), None))
    console.print(table)


def render_model_steps(records: list[dict[str, Any]], console: Any) -> None:
    """The model's training step per variant (original, converted to each p) and the verdicts."""
    if not records:
        return
    from rich.markup import escape
    from rich.table import Table

    from normbench.bench.model_step import step_verdicts

    table = Table(title="[bold]the model's training step (forward + backward)[/]")
    for col in ("model", "batch-norm", "layers converted", "dtype", "input", "time ± IQR", "vs original"):
        table.add_column(col)
    for r in records:
        if r.get("status") != "ok":
            table.add_row(escape(r["model"]), r["norm"], str(r.get("converted_layers", "-")), r["dtype"], r["shape"],
                          f"[yellow]{r.get('status')}: {escape(str(r.get('reason')))}[/]", "-")
            continue
        table.add_row(escape(r["model"]), r["norm"], str(r["converted_layers"]), r["dtype"], r["shape"],
                      _fmt_time_iqr(r["time_median_s"], r.get("time_iqr_s")),
                      "[dim]ref[/]" if r["norm"] == "original" else _fmt_speedup(r.get("speedup_vs_original")))
    console.print(table)
    for line in step_verdicts(records):
        console.print(escape(line))


@click.command("profile")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--output-dir", default="normbench-out", show_default=True, type=click.Path(file_okay=False),
              help="Where the figures go.")
@click.option("--format", "formats", default="png", show_default=True, help="Figure formats: png, svg (comma-separated).")
@click.option("--metric", type=click.Choice(["gbps", "time"]), default="gbps", show_default=True,
              help="Plot achieved GB/s (against the copy bandwidth) or time (against the speed of light).")
def plot_profile(file: str, output_dir: str, formats: str, metric: str) -> int:
    """Draw a `normbench profile` results file: one figure per shape group, a panel per dtype and
    pass, a line per norm and implementation, and the device's copy bandwidth."""
    from normbench.axes import split_list
    from normbench.errors import UserError
    from normbench.cli.outcome import finish
    from normbench.plots.profile import FORMATS, read_profile_records
    from normbench.plots.profile import plot_profile as draw

    fmts = [f.lower() for f in split_list(formats)]
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts or bad:
        raise UserError(f"--format: use {', '.join(FORMATS)}, got {formats!r}")
    records = read_profile_records(file)
    for p in draw(records, output_dir, fmts, metric):
        click.echo(str(p))
    return finish(records)
