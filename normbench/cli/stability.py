"""``normbench stability`` (overflow, underflow and error of the norm layers in fp16, bf16 and fp8
against float64) and ``normbench plot stability FILE`` (its figure). Both only parse, call
:mod:`normbench.numerics` or :mod:`normbench.plots.stability`, and render."""

from __future__ import annotations

import math
import sys
from typing import Any

import click

from normbench.cli.model_options import check_model_options, model_options
from normbench.results import ResultsWriter

FAIL_ON_HELP = "overflow (any overflow or non-finite output/gradient) and/or error:<ulps>, comma-separated"


def parse_fail_on(text: str | None) -> tuple[bool, float | None]:
    """``"overflow,error:64"`` -> ``(True, 64.0)``; a UserError for anything else."""
    from normbench.axes import split_list
    from normbench.errors import UserError

    overflow, ulps = False, None
    if text is None:
        return overflow, ulps
    items = split_list(text)
    if not items:
        raise UserError(f"--fail-on: use {FAIL_ON_HELP}")
    for item in items:
        if item == "overflow":
            overflow = True
        elif item.startswith("error:"):
            try:
                ulps = float(item.split(":", 1)[1])
            except ValueError:
                ulps = math.nan
            if not ulps > 0 or math.isinf(ulps):
                raise UserError(f"--fail-on {item!r}: the error threshold is a positive number of ulps, e.g. error:64")
        else:
            raise UserError(f"--fail-on {item!r}: use {FAIL_ON_HELP}")
    return overflow, ulps


def _fmt_scale(value: float | None, open_end: str = "") -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{open_end}{value:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def _measured(m: dict[str, Any]) -> str:
    if m["scales"] == 0:
        return "[dim]no sweep[/]"
    if m["lo"] is None:
        return "[bold red]none[/]"
    lo = _fmt_scale(m["lo"], "≤" if m["lo_open"] else "")
    hi = _fmt_scale(m["hi"], "≥" if m["hi_open"] else "")
    return f"{lo} .. {hi}"


def _analytic(a: dict[str, Any] | None) -> str:
    if a is None:
        return "-"
    lo = f"{a['lo']:.2g}" if a["lo"] > 0 else "0"
    text = f"{lo} .. {a['hi']:.2g}  [dim]({a['lo_short'] or '-'} .. {a['hi_short']})[/]"
    if a.get("eps_rounds_to_zero"):
        text += "\n[yellow]eps rounds to 0[/]"
    return text


@click.command()
@click.option("--norm", default="l2,l1,linf", show_default=True,
              help="Norms, comma-separated: l2, l1, linf, top<k> (batch-norm), layernorm, rmsnorm, groupnorm "
                   "and their Lp variants (l1-layernorm ...).")
@click.option("--dtype", default="fp16,bf16,fp8_e4m3,fp8_e5m2,fp32", show_default=True,
              help="Dtypes: fp16, bf16, fp8_e4m3 (E4M3FN, max 448), fp8_e5m2 (max 57344), fp32.")
@click.option("--compute", default="framework,native", show_default=True,
              help="framework: the layer as shipped, run in the dtype (float32 statistics inside); native: every "
                   "intermediate rounded to the dtype, reductions in the dtype.")
@click.option("--reduction", default="pairwise", show_default=True,
              help="Order of native reductions, comma-separated: pairwise (tree; means as means of partial means), "
                   "sequential (running sum), sum (sum rounded once, then divided).")
@click.option("--impl", default="normbench", show_default=True,
              help="Framework layers, comma-separated: normbench (every norm), torch (torch's own L2 layers).")
@click.option("--eps", type=float, default=1e-5, show_default=True, help="The layers' eps.")
@click.option("--case", "case", help="Input generators, comma-separated: gauss (scale sweep), offset, heavy_tail, "
              "outliers, constant, mixed_scale, tiny, large, deviation, beyond_range. Default: all "
              "(none when --input is given).")
@click.option("--shape", help="Shape of the generated cases, e.g. 64x256x14x14 (dimension 1 the channel; "
              "default 32x4x128, quick 16x4x64; tiny and large keep theirs).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="Your own tensors: .pt/.pth (torch.load weights_only), .npy or .npz; one case per tensor.")
@click.option("--fp8-compute", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True,
              help="The arithmetic dtype of fp8 cells (fp8 is storage only).")
@click.option("--fail-on", help=f"Exit with status 1 when a cell fails: {FAIL_ON_HELP}.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cpu or cuda.")
@click.option("--quick", is_flag=True, help="A reduced grid that finishes in seconds (CI uses it).")
@click.option("--output", type=click.Path(dir_okay=False),
              help="Write the records here as cells finish: .json, .jsonl or .csv.")
@click.option("--resume", is_flag=True, help="Keep the cells already in --output and run only the others "
              "(refused when the file was measured on another device, torch version or thread count).")
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@model_options
def stability(norm: str, dtype: str, compute: str, reduction: str, impl: str, eps: float, case: str | None,
              shape: str | None, input_path: str | None, fp8_compute: str, fail_on: str | None, device: str, quick: bool,
              output: str | None, resume: bool, force: bool, quiet: bool, model: str | None, weights: str | None,
              model_input: str | None, input_shape: str | None, train: bool, max_elements: int | None) -> int:
    """Where does each norm layer overflow, underflow or lose accuracy in fp16, bf16 and fp8,
    against a float64 reference, forward and input gradient?

    With no options runs every input case for L2, L1 and L-inf batch-norm in every dtype, both
    compute models, and prints per norm and dtype the safe range of input scales (measured, and
    the analytic thresholds beside it), the worst error and the cases that failed.

    With --model, every normalization layer of the model is a case of its own kind and axes (its
    captured input and upstream gradient; a layer's own eps), measured with each norm's
    dispersion, with its headroom: how far its input may grow before the first failure.
    """
    from normbench.axes import dtype_name, parse_dtypes, parse_norms, parse_shape, resolve_device, split_list
    from normbench.errors import UserError
    from normbench.numerics.runner import KEY_FIELDS, StabilitySpec, cells, iter_records
    from normbench.results import check_output_options, environment, open_results, schema_name

    check_output_options(output, resume, force)
    fail_overflow, fail_ulps = parse_fail_on(fail_on)
    dev = resolve_device(device)
    norms = tuple(n.name for n in parse_norms(norm))
    cases = None if case is None else tuple(split_list(case))
    if cases is None and (input_path is not None or model is not None):
        cases = ()
    if cases is not None and not cases and input_path is None and model is None:
        raise UserError("--case needs at least one case name")
    check_model_options(model, weights=weights, model_input=model_input, input_shape=input_shape,
                        max_elements=max_elements)
    captured = None
    if model is not None:
        from normbench.models.capture import layer_cases
        from normbench.models.prepare import capture_model, prepare_model

        prepared = prepare_model(model, weights, model_input, None if input_shape is None else parse_shape(input_shape),
                                 dev)
        keep = max_elements if max_elements is not None else (4096 if quick else 65536)
        captured = capture_model(prepared, train=train, max_elements=keep)
        if not captured.analysed:
            reasons = "; ".join(f"{layer.name}: {layer.skipped}" for layer in captured.skipped[:3])
            raise UserError(f"--model {model}: no normalization layer could be captured ({reasons})")
    spec = StabilitySpec(
        norms=norms,
        dtypes=tuple(dtype_name(d) for d in parse_dtypes(dtype)),
        computes=tuple(dict.fromkeys(split_list(compute))),
        reductions=tuple(dict.fromkeys(split_list(reduction))),
        impls=tuple(dict.fromkeys(split_list(impl))),
        shape=None if shape is None else parse_shape(shape),
        eps=eps,
        cases=cases,
        input_path=input_path,
        layers=() if captured is None else layer_cases(captured),
        quick=quick,
        device=dev,
        fp8_compute=fp8_compute,
    )
    grid = cells(spec)
    writer = open_results(output, schema_name("stability"), environment(dev), KEY_FIELDS, resume=resume,
                          force=force) if output else None

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    show = not quiet and sys.stderr.isatty()
    records: list[dict[str, Any]] = []
    with Progress(TextColumn("[bold]stability[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=not show, transient=True) as bar:
        task = bar.add_task("cells", total=len(grid))
        skip = writer.has if writer else None
        for record in iter_records(spec, skip=skip, grid=grid):
            if writer:
                writer.write(record)
            records.append(record)
            bar.update(task, advance=1)
    shown = writer.records if writer else records
    _render(shown, spec, output, captured)
    bad: list[dict[str, Any]] = []
    if fail_overflow or fail_ulps is not None:
        from normbench.numerics.summary import case_label, fails_threshold

        bad = [r for r in shown if fails_threshold(r, fail_overflow, fail_ulps)]
        if bad:
            first = bad[0]
            click.echo(
                f"fail-on {fail_on}: {len(bad)} of {len(shown)} cells fail, e.g. {first['norm']} {first['dtype']} "
                f"{first['compute']} {case_label(first['case'])}",
                err=True,
            )
    from normbench.cli.outcome import finish

    return finish(shown, failed=bool(bad))


def _user_table(records: list[dict[str, Any]]) -> Any:
    """One row per cell on the user's tensors: what overflowed and how far off it came out."""
    from rich.markup import escape
    from rich.table import Table

    from normbench.numerics.summary import failures

    table = Table(title="your tensors (--input)")
    for col in ("tensor", "shape", "norm", "dtype", "compute", "error, ulps", "grad error, ulps", "verdict"):
        table.add_column(col)

    def ulps(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    for r in records:
        case = r["case"]
        name = escape(case["file"] + (f"[{case['key']}]" if "key" in case else ""))
        compute = r["compute"] + (f" {r['reduction']}" if r.get("reduction") else "") + (
            " torch" if r.get("impl") == "torch" else "")
        if r.get("status") != "ok":
            verdict = f"[yellow]{r.get('status')}: {escape(str(r.get('reason')))}[/]"
            table.add_row(name, r.get("shape", ""), r["norm"], r["dtype"], compute, "-", "-", verdict)
            continue
        why = failures(r)
        verdict = f"[red]{', '.join(why)}[/]" if why else "[green]ok[/]"
        table.add_row(name, r.get("shape", ""), r["norm"], r["dtype"], compute, ulps(r.get("err_ulps")),
                      ulps(r.get("grad_err_ulps")), verdict)
    return table


def _layer_table(records: list[dict[str, Any]]) -> Any:
    """One row per layer, dtype and compute model, in network order; a column per dispersion:
    the verdict at the captured scale and the headroom."""
    from rich.markup import escape
    from rich.table import Table

    from normbench.axes import format_shape
    from normbench.numerics.summary import compute_label, dispersion, failures, headroom_text, layer_records

    recs = layer_records(records)
    disps = list(dict.fromkeys(dispersion(r) for r in recs))
    table = Table(title="normbench stability --model: each normalization layer, its captured input "
                        "(verdict now, headroom: how far the input may grow)")
    for col in ("layer", "kind", "input", "dtype", "compute", *disps):
        table.add_column(col)
    rows: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in recs:
        rows.setdefault((r["layer"], r["dtype"], compute_label(r)), {})[dispersion(r)] = r
    for (layer, dtype, compute), by_disp in rows.items():
        first = next(iter(by_disp.values()))
        kept = first.get("kept") or {}
        shape = format_shape(first.get("layer_shape") or [])
        if kept and kept.get("kept") != kept.get("of"):
            shape += f" [dim](kept {kept['kept']}/{kept['of']} {kept['unit']})[/]"
        cells = []
        for d in disps:
            r = by_disp.get(d)
            if r is None:
                cells.append("-")
            elif r.get("status") != "ok":
                cells.append(f"[yellow]{r.get('status')}[/]")
            elif r.get("safe"):
                cells.append(f"[green]ok[/] {headroom_text(r)}")
            else:
                why = failures(r)
                cells.append(f"[red]{escape(why[0] if why else 'unsafe')}[/] {headroom_text(r)}")
        table.add_row(escape(layer), first.get("layer_kind", ""), shape, dtype, compute, *cells)
    return table


def _render_layers(out: Any, records: list[dict[str, Any]], captured: Any) -> None:
    from rich.markup import escape

    from normbench.numerics.runner import HEADROOM_SEARCH
    from normbench.numerics.summary import layer_verdicts

    out.print(_layer_table(records))
    for line in layer_verdicts(records):
        out.print(escape(line))
    out.print(f"[dim]headroom: the largest factor found safe; {HEADROOM_SEARCH}. Upstream gradients are the "
              f"captured ones times the layer's weight, scaled by a power of 2 into [1, 2) as a loss scaler would.[/]")
    if captured is not None:
        out.print(f"[dim]capture: one {captured.mode}-mode pass, loss: {captured.loss}.[/]")
        for layer in captured.skipped:
            out.print(f"[yellow]skipped {escape(layer.name)} ({layer.kind}): {escape(str(layer.skipped))}[/]")


def _render(records: list[dict[str, Any]], spec: Any, output: str | None, captured: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from normbench.numerics.formats import FORMATS
    from normbench.numerics.summary import summarize

    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    every = records
    if any(r.get("layer") is not None for r in records):
        _render_layers(out, records, captured)
        records = [r for r in records if r.get("layer") is None]
        if not records:
            _render_notes(out, every, spec, output)
            return
    table = Table(title="normbench stability: safe input scale sigma (Gaussian sweep) and failures")
    for col, ratio in (("norm", None), ("dtype", None), ("compute", None), ("safe sigma\nmeasured", None),
                       ("safe sigma, analytic\n(what limits it)", 3), ("worst error, ulps\n(where)", 3),
                       ("failed cases", 4)):
        table.add_column(col, ratio=ratio)
    for row in summarize(records):
        compute = row["compute"]
        if compute == "native":
            compute += f" [dim]{row['reduction']}" + (f", in {row['compute_dtype']}" if row["compute_dtype"] != row["dtype"] else "") + "[/]"
        else:
            if row["impl"] == "torch":
                compute += " [dim]torch[/]"
            if row["compute_dtype"] != row["dtype"]:
                compute += f" [dim]in {row['compute_dtype']}[/]"
        worst = "-" if row["worst_err_ulps"] is None else f"{row['worst_err_ulps']:.3g} [dim]{escape(row['worst_case'])}[/]"
        tol_ulps = spec.tolerance(row["dtype"]) / FORMATS[row["dtype"]].eps
        if row["worst_err_ulps"] is not None and row["worst_err_ulps"] > tol_ulps:
            worst = f"[red]{worst}[/]"
        shown_failures = [escape(f["short"]) for f in row["failed_cases"]]
        failed = ", ".join(shown_failures[:5]) + (f" +{len(shown_failures) - 5} more" if len(shown_failures) > 5 else "")
        failed = f"[red]{failed}[/]" if failed else "[green]none[/]"
        notes = []
        if row["skipped"]:
            notes.append(f"[yellow]{row['skipped']} skipped[/]")
        if row["errors"]:
            notes.append(f"[bold red]{row['errors']} errors[/]")
        if notes:
            failed += "; " + ", ".join(notes)
        table.add_row(row["norm"], row["dtype"], compute, _measured(row["measured"]), _analytic(row["analytic"]),
                      worst, failed)
    out.print(table)
    user = [r for r in records if r.get("case", {}).get("name") == "file"]
    if user:
        out.print(_user_table(user))
    _render_notes(out, every, spec, output)


def _render_notes(out: Any, records: list[dict[str, Any]], spec: Any, output: str | None) -> None:
    """The footnotes under the tables: what "safe" means, fp8, skipped and failed cells, the file."""
    from rich.markup import escape

    from normbench.numerics.summary import fp8_note

    tol = ", ".join(f"{d} {spec.tolerance(d):.2g}" for d in spec.dtypes)
    sweep = any(r.get("case", {}).get("name") == "gauss" for r in records)
    out.print(f"[dim]Safe: finite, no overflow, at most {spec.max_input_underflow:.0%} of the input underflowing, "
              f"relative error of output and input gradient at most {tol} (min({spec.safe_ulps:g} ulps, "
              f"{spec.max_safe_rel_err:g}))."
              + (" Scales stepped by decades; ≤/≥: safe up to the end of the sweep." if sweep else "") + "[/]")
    note = fp8_note(spec.dtypes, spec.fp8_compute)
    if note:
        out.print(f"[dim]{note}[/]")
    skipped = [r for r in records if r.get("status") == "skipped"]
    if skipped:
        reasons = sorted({r.get("reason") or "" for r in skipped})
        out.print(f"[yellow]{len(skipped)} cells skipped:[/] " + escape("; ".join(reasons[:3])))
    errors = [r for r in records if r.get("status") == "error"]
    if errors:
        out.print(f"[bold red]{len(errors)} cells failed with an error:[/] {escape(str(errors[0].get('reason')))}")
    if output:
        out.print(f"[dim]records: {output}[/]")


@click.command("stability")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--output-dir", default="normbench-out", show_default=True, help="Where to write the figure.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True)
@click.option("--compute", type=click.Choice(["native", "framework", "both"]), default="both", show_default=True,
              help="Which compute model's lines to draw (native solid, framework dashed).")
def plot_stability(file: str, output_dir: str, fmt: str, compute: str) -> int:
    """Draw a `normbench stability` results file: error against input scale, one line per norm,
    a panel per dtype, the overflow and underflow bounds marked; for --model records, the
    headroom of each layer per norm (stability_headroom)."""
    from normbench.cli.outcome import finish
    from normbench.plots.stability import plot_stability_records, read_stability_records

    records = read_stability_records(file)
    for path in plot_stability_records(records, output_dir, fmt=fmt, compute=compute):
        click.echo(str(path))
    return finish(records)
