"""``normbench compare BASE NEW...`` (what moved between two results files of one command) and
``normbench plot compare FILE...`` (its figure). Both only parse, call :mod:`normbench.compare` or
:mod:`normbench.plots.compare`, and render."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from normbench.compare import Comparison

THRESHOLD_HELP = ("The smallest change of a profile cell's time that counts, in percent: slower when the "
                  "whole interval of NEW/BASE lies above 1 + threshold, faster below 1 / (1 + threshold).")
VS_TORCH_HELP = ("Profile: judge each cell's time relative to torch's layer timed in the same rounds (drift of a "
                 "shared machine between the two runs cancels; torch's own cells are the reference).")
VERDICT_COLORS = {"slower": "bold red", "unstable": "bold red", "worse": "red", "failed": "bold red",
                  "faster": "green", "stabler": "green", "better": "green", "same": "dim", "unsure": "yellow",
                  "skipped": "dim yellow"}


@click.command()
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("new", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--threshold", default="5%", show_default=True, help=THRESHOLD_HELP)
@click.option("--fail-on", type=click.Choice(["slower", "unstable", "any"]),
              help="Exit with status 1 when a cell regressed. slower: a profile cell is slower; unstable: a "
                   "stability cell turned unsafe or overflows, or more experiment runs diverged; any: either of "
                   "those, or worse (error x2, a metric beyond seed noise), or failed (ok in BASE, an error in NEW).")
@click.option("--vs-torch", is_flag=True, help=VS_TORCH_HELP)
@click.option("--output", type=click.Path(dir_okay=False),
              help="Write the comparison here: .json (schema normbench.compare/1), .jsonl or .csv.")
@click.option("--force", is_flag=True, help="Overwrite an existing --output file.")
@click.option("--limit", type=click.IntRange(min=0), default=40, show_default=True,
              help="Rows shown per NEW file, most moved first (0: all). The summary and --output have every row.")
def compare(base: str, new: tuple[str, ...], threshold: str, fail_on: str | None, vs_torch: bool,
            output: str | None, force: bool, limit: int) -> int:
    """Did my change make norm layers faster, slower or less stable? Match the records of BASE
    and each NEW results file (profile, stability, equivalence or halfprec; .json, .jsonl or .csv)
    by their key fields and judge every matched cell.

    Profile: the ratio of medians NEW/BASE with a 95% interval from both files' raw per-repeat
    times, and a verdict: faster, slower, same or unsure. Stability: safety flips, overflows
    appearing or disappearing, error ratios in ulps. Experiments: final metrics, mean ± std over
    seeds, against the seed noise. Environment differences are printed first.
    """
    from normbench.compare import failing, parse_threshold, run, write_comparison
    from normbench.results import check_output_options

    check_output_options(output, force=force)
    comparisons = run(base, new, parse_threshold(threshold), vs_torch=vs_torch)
    from rich.console import Console

    out = Console()
    if not out.is_terminal:  # a file or a pipe: no terminal width to respect
        out = Console(width=140)
    for cmp in comparisons:
        render(cmp, out, limit)
    if output:
        click.echo(f"comparison written to {write_comparison(comparisons, output, force=force)}", err=True)
    bad = failing(comparisons, fail_on)
    if bad:
        first = bad[0]
        click.echo(f"fail-on {fail_on}: {len(bad)} cell(s) {', '.join(sorted({r['verdict'] for r in bad}))}, "
                   f"e.g. {first['cell']} ({first['verdict']}); exit code 1.", err=True)
        return 1
    return 0


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _verdict(row: dict[str, Any]) -> str:
    v = row["verdict"]
    return f"[{VERDICT_COLORS.get(v, '')}]{v}[/]"


def _ulps(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3g}"


def _flag(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _number(value: Any, digits: int = 4) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}g}"


def _profile_table(cmp: Any, rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from normbench.cli.profile import _fmt_time_iqr

    what = "time / torch's time in the same round" if cmp.vs_torch else "time"
    table = Table(caption=f"NEW/BASE: ratio of the medians of {what}; interval: 95% (Hodges-Lehmann on the raw "
                          f"times); threshold {cmp.threshold * 100:g}%", caption_justify="left")
    for col, justify in (("cell", "left"), ("BASE", "right"), ("NEW", "right"), ("NEW/BASE", "right"),
                         ("95% interval", "right"), ("verdict", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        b, n = r.get("base_median_s"), r.get("new_median_s")
        interval = "-" if r.get("ci_low") is None else f"{r['ci_low']:.3f} .. {r['ci_high']:.3f}"
        verdict = _verdict(r) + (f" [dim]{r['note']}[/]" if r.get("note") else "")
        if cmp.vs_torch:
            b_text, n_text = (_ratio(r.get(f)) + "x torch" if r.get(f) else "-" for f in ("base_vs_torch", "new_vs_torch"))
        else:
            b_text, n_text = ("-" if not t else _fmt_time_iqr(t, None) for t in (b, n))
        table.add_row(r["cell"], b_text, n_text, _ratio(r.get("ratio")), interval, verdict)
    return table


def _stability_table(cmp: Any, rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from normbench.compare.stability import ERROR_FACTOR

    table = Table(caption=f"safe / overflow / error in ulps: BASE -> NEW; worse or better: an error ratio beyond "
                          f"x{ERROR_FACTOR:g}",
                  caption_justify="left")
    for col in ("cell", "safe", "overflow", "error, ulps", "grad error, ulps", "verdict"):
        table.add_column(col)
    for r in rows:
        if r["verdict"] == "skipped" or r["verdict"] == "failed":
            table.add_row(r["cell"], "", "", "", "", _verdict(r) + f" [dim]{r.get('note')}[/]")
            continue
        err = f"{_ulps(r.get('base_err_ulps'))} -> {_ulps(r.get('new_err_ulps'))}"
        grad = f"{_ulps(r.get('base_grad_err_ulps'))} -> {_ulps(r.get('new_grad_err_ulps'))}"
        changes = r.get("changes") or []
        table.add_row(r["cell"], f"{_flag(r.get('base_safe'))} -> {_flag(r.get('new_safe'))}",
                      f"{_flag(r.get('base_overflow'))} -> {_flag(r.get('new_overflow'))}", err, grad,
                      _verdict(r) + (f" [dim]{'; '.join(changes)}[/]" if changes else ""))
    return table


def _experiment_table(cmp: Any, rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    from normbench.compare.experiments import NOISE_FACTOR

    table = Table(caption=f"final metrics: mean ± std over seeds (n seeds); moved: |NEW - BASE| beyond "
                          f"{NOISE_FACTOR:g} x the pooled seed std", caption_justify="left")
    for col, justify in (("group", "left"), ("metric", "left"), ("BASE", "right"), ("NEW", "right"),
                         ("NEW - BASE", "right"), ("noise band", "right"), ("verdict", "left")):
        table.add_column(col, justify=justify)

    def side(mean: Any, std: Any, n: Any) -> str:
        return "-" if mean is None else f"{_number(mean)}" + ("" if std is None else f" ± {_number(std, 2)}") + f" ({n})"

    for r in rows:
        if r["metric"] == "diverged":
            b, n = f"{r['base_mean']} of {r['base_seeds']}", f"{r['new_mean']} of {r['new_seeds']}"
        else:
            b, n = side(r["base_mean"], r["base_std"], r["base_seeds"]), side(r["new_mean"], r["new_std"], r["new_seeds"])
        band = "-" if r.get("delta_low") is None else f"±{_number((r['delta_high'] - r['delta_low']) / 2, 2)}"
        delta = "-" if r.get("delta") is None else f"{r['delta']:+.4g}"
        table.add_row(r["cell"], r["metric"], b, n, delta, band,
                      _verdict(r) + (f" [dim]{r['note']}[/]" if r.get("note") else ""))
    return table


def render(cmp: "Comparison", console: Any, limit: int = 40) -> None:
    """One comparison: environment differences first, notes, the table of the most moved rows,
    the added and removed cells, and the one-line summary."""
    from rich.markup import escape

    console.print(f"[bold]{escape(cmp.base)}[/] -> [bold]{escape(cmp.new)}[/]  [dim]({cmp.kind.name})[/]")
    if cmp.environment_differences:
        console.print("[yellow]Environment differs (compared anyway; timings across machines or settings differ "
                      "for reasons besides the change):[/] " + escape(", ".join(cmp.environment_differences)))
    for note in cmp.notes:
        console.print(f"[dim]Note: {escape(note)}[/]")
    rows = cmp.rows if limit == 0 else cmp.rows[:limit]
    make = (_profile_table if cmp.kind.name == "profile" else _stability_table if cmp.kind.name == "stability"
            else _experiment_table)
    if rows:
        shown = [{**r, "cell": escape(str(r["cell"])), "note": escape(str(r["note"])) if r.get("note") else None}
                 for r in rows]  # labels and reasons come from the files: plain text, not markup
        console.print(make(cmp, shown))
    if len(cmp.rows) > len(rows):
        console.print(f"[dim]... and {len(cmp.rows) - len(rows)} more rows (--limit 0 shows all)[/]")
    for what, cells, where in (("added", cmp.added, "NEW"), ("removed", cmp.removed, "BASE")):
        if cells:
            shown = ", ".join(escape(str(c["cell"])) for c in cells[:8]) + (" ..." if len(cells) > 8 else "")
            console.print(f"[cyan]{len(cells)} {what}[/] (only in {where}): {shown}")
    console.print(f"[bold]{escape(cmp.summary())}[/]")


def _with_files(text: str) -> str:
    return "With BASE NEW results files: " + text[0].lower() + text[1:]


@click.command("compare")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output-dir", default="normbench-out", show_default=True, type=click.Path(file_okay=False),
              help="Where the figure goes.")
@click.option("--format", "formats", default="png", show_default=True, help="Figure formats: png, svg (comma-separated).")
@click.option("--threshold", default="5%", show_default=True, help=_with_files(THRESHOLD_HELP))
@click.option("--vs-torch", is_flag=True, help=_with_files(VS_TORCH_HELP))
@click.option("--limit", type=click.IntRange(min=0), default=40, show_default=True,
              help="Rows drawn per panel, most moved first (0: all).")
def plot_compare(files: tuple[str, ...], output_dir: str, formats: str, threshold: str, vs_torch: bool,
                 limit: int) -> int:
    """Draw a comparison: one FILE written by `normbench compare --output` (.json, .jsonl, .csv), or
    BASE NEW... results files compared on the spot. Each row a cell, at its ratio NEW/BASE with
    its interval (profile), its error ratio (stability) or its difference with the seed noise
    (experiments), coloured by verdict."""
    from normbench.axes import split_list
    from normbench.compare import parse_threshold, read_comparison, run
    from normbench.errors import UserError
    from normbench.plots.compare import FORMATS
    from normbench.plots.compare import plot_compare as draw

    fmts = [f.lower() for f in split_list(formats)]
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts or bad:
        raise UserError(f"--format: use {', '.join(FORMATS)}, got {formats!r}")
    if len(files) == 1:
        rows = read_comparison(files[0])
    else:
        rows = [r for c in run(files[0], files[1:], parse_threshold(threshold), vs_torch=vs_torch) for r in c.records()]
    for p in draw(rows, output_dir, fmts, limit=limit):
        click.echo(str(p))
    return 0
