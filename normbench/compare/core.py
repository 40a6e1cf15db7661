"""Matching two results files of one command and judging every matched cell.

``compare_files(base, new)`` reads both files, refuses a pair of different commands (a
:class:`~normbench.errors.UserError`: one line, exit code 2 on the command line), matches their
records by the kind's key fields (:mod:`normbench.compare.kinds`), lists the records found in one
file only as added or removed, and judges each matched cell with the kind's module
(:mod:`~normbench.compare.profile`, :mod:`~normbench.compare.stability`,
:mod:`~normbench.compare.experiments`). :func:`run` does it for one BASE and several NEW files.
The result is a :class:`Comparison`, whose rows are flat dicts of JSON values: they are what
``--output`` writes (schema ``normbench.compare/1``) and what ``normbench plot compare`` draws.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from normbench.compare import experiments, profile, stability
from normbench.compare.kinds import COMMON_VERDICTS, FAIL_ON, KINDS, Kind, load, record_status
from normbench.compare.stats import CONFIDENCE
from normbench.errors import UserError
from normbench.results import Results, environment_differences, record_key, schema_name

SCHEMA = schema_name("compare")
DEFAULT_THRESHOLD = 0.05
# The environment fields whose difference between two files is said before the comparison.
ENVIRONMENT_FIELDS = ("device", "device_name", "cpu_model", "threads", "torch_version", "cuda_version",
                      "normbench_version", "malloc", "cache", "world_size", "backend")
# Record fields that stand in for the environment in a file that has none (CSV).
RECORD_ENVIRONMENT_FIELDS = ("device", "threads", "cache", "world_size")


@dataclass
class Comparison:
    """BASE against one NEW file: the rows of matched cells (each with a ``verdict`` and a
    ``moved`` score, most moved first), the records found only in NEW (``added``) or only in BASE
    (``removed``) as rows of their key fields, the environment differences and notes."""

    kind: Kind
    base: str
    new: str
    threshold: float
    vs_torch: bool = False  # profile: cells judged by their time relative to torch's layer
    rows: list[dict[str, Any]] = field(default_factory=list)
    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    environment_differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many rows got each verdict: the kind's verdicts (zeros included) first, then the
        common ones and ``added`` / ``removed`` where there are any."""
        out = {v: 0 for v in self.kind.verdicts}
        for r in self.rows:
            out[r["verdict"]] = out.get(r["verdict"], 0) + 1
        for v in COMMON_VERDICTS:
            if not out.get(v):
                out.pop(v, None)
        if self.added:
            out["added"] = len(self.added)
        if self.removed:
            out["removed"] = len(self.removed)
        return out

    def summary(self) -> str:
        """One line: ``3 slower, 1 faster, 40 same, 2 unsure`` (and failed, skipped, added,
        removed where there are any)."""
        return ", ".join(f"{n} {v}" for v, n in self.counts().items())

    def fails(self, fail_on: str) -> list[dict[str, Any]]:
        """The rows that trip ``--fail-on fail_on`` (``slower``, ``unstable`` or ``any``)."""
        if fail_on not in FAIL_ON:
            raise UserError(f"--fail-on: use {', '.join(FAIL_ON)}, got {fail_on!r}")
        return [r for r in self.rows if r["verdict"] in FAIL_ON[fail_on]]

    def records(self) -> list[dict[str, Any]]:
        """Every row as a record of a ``normbench.compare/1`` file: the matched cells, then the
        added and removed ones (verdict ``added`` / ``removed``), each naming its files."""
        out = []
        for r in [*self.rows, *self.added, *self.removed]:
            out.append({"kind": self.kind.name, "base": self.base, "new": self.new, "threshold": self.threshold,
                        **({"vs_torch": True} if self.vs_torch else {}), **r})
        return out


def parse_threshold(text: str | float) -> float:
    """``"5%"``, ``"5"`` or ``5`` -> 0.05: a percentage (the % sign optional), more than 0 and less
    than 100; a UserError for anything else."""
    raw = str(text).strip()
    number = raw[:-1].strip() if raw.endswith("%") else raw
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not 0 < value < 100:
        raise UserError(f"--threshold {raw!r}: a percentage above 0 and below 100, e.g. 5%")
    return value / 100


def _file_environment(res: Results) -> dict[str, Any]:
    """A file's environment, or for a file without one (CSV) what its records say of it."""
    if res.environment:
        return res.environment
    env: dict[str, Any] = {}
    for f in RECORD_ENVIRONMENT_FIELDS:
        values = {json.dumps(r.get(f)) for r in res.records if r.get(f) is not None}
        if len(values) == 1:
            env[f] = json.loads(values.pop())
    return env


def _environment_differences(base: Results, new: Results) -> list[str]:
    """``field BASE -> NEW`` for each of :data:`ENVIRONMENT_FIELDS` that differs (on a CPU the
    device name is the CPU model: said once)."""
    diffs = environment_differences(base, _file_environment(new), ENVIRONMENT_FIELDS)
    cpu = [d.split(" ", 1)[1] for d in diffs if d.startswith("cpu_model ")]
    return [d for d in diffs if not (d.startswith("device_name ") and d.split(" ", 1)[1] in cpu)]


def _value_label(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        from normbench.numerics.summary import case_label

        return case_label(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _label_fields(kind: Kind, records: Iterable[dict[str, Any]]) -> list[str]:
    """The group fields that tell the records apart (those with one value in every record are
    left out of the labels); all of them when none does (a single cell)."""
    records = list(records)
    fields = [f for f in kind.group_fields
              if len({json.dumps(r.get(f), sort_keys=True) for r in records}) > 1]
    return fields or list(kind.group_fields)


def _label(record: dict[str, Any], fields: Sequence[str]) -> str:
    """The values of ``fields`` in ``record``, space-separated (``l2 eager fp32``)."""
    return " ".join(_value_label(record.get(f)) for f in fields if record.get(f) is not None) or "(no key fields)"


def _index(records: Sequence[dict[str, Any]], fields: Sequence[str]) -> tuple[dict[tuple, list[dict[str, Any]]], int]:
    """Records by their key (a list per key: experiments pool seeds), and how many records
    repeated a key already seen (a seedless key, or a file with a duplicate)."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    dupes = 0
    for r in records:
        key = record_key(r, fields)
        dupes += key in out
        out.setdefault(key, []).append(r)
    return out, dupes


def _axes(record: dict[str, Any], fields: Sequence[str], label_fields: Sequence[str]) -> dict[str, Any]:
    return {"cell": _label(record, label_fields), **{f: record.get(f) for f in fields}}


def _status_row(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """The row of a cell that cannot be judged because a side is not ``ok``; None when both are."""
    b, n = record_status(base), record_status(new)
    if b == "ok" and n == "ok":
        return None
    if b == "ok" and n == "error":
        return {"verdict": "failed", "moved": 500.0, "note": f"error in NEW: {new.get('reason')}"}
    side, rec = ("BASE", base) if b != "ok" else ("NEW", new)
    return {"verdict": "skipped", "moved": -1.0, "note": f"{record_status(rec)} in {side}: {rec.get('reason')}"}


def compare_results(kind: Kind, base: Results, new: Results, base_name: str = "BASE", new_name: str = "NEW",
                    threshold: float = DEFAULT_THRESHOLD, confidence: float = CONFIDENCE,
                    vs_torch: bool = False) -> Comparison:
    """Match the records of two results of one ``kind`` and judge every matched cell (see the
    kind modules for the verdicts); rows most moved first. ``vs_torch`` (profile only): judge each
    cell's time relative to torch's layer timed in the same rounds."""
    if vs_torch and kind.name != "profile":
        raise UserError(f"--vs-torch judges profile times against torch's layer; these are {kind.name} results")
    cmp = Comparison(kind, base_name, new_name, threshold, vs_torch)
    cmp.environment_differences = _environment_differences(base, new)
    for name, res in ((base_name, base), (new_name, new)):
        if not res.environment:
            cmp.notes.append(f"{name} records no environment (CSV): differences of machine or versions unknown")
    fields = kind.group_fields
    labels = _label_fields(kind, [*base.records, *new.records])
    b_index, b_dupes = _index(base.records, fields)
    n_index, n_dupes = _index(new.records, fields)
    if not kind.is_experiment:
        for name, dupes in ((base_name, b_dupes), (new_name, n_dupes)):
            if dupes:
                cmp.notes.append(f"{name} repeats {dupes} cell(s): the last record of each is compared")
    for key, b_runs in b_index.items():
        if key not in n_index:
            cmp.removed.append({**_axes(b_runs[-1], fields, labels), "verdict": "removed"})
            continue
        n_runs = n_index[key]
        axes = _axes(b_runs[-1], fields, labels)
        if kind.is_experiment:
            cmp.rows.extend(_experiment_rows(kind, axes, b_runs, n_runs))
            continue
        b, n = b_runs[-1], n_runs[-1]
        row = _status_row(b, n)
        if row is None:
            row = (profile.judge(b, n, threshold, confidence, vs_torch) if kind.name == "profile"
                   else stability.judge(b, n))
        cmp.rows.append({**axes, **row})
    for key, n_runs in n_index.items():
        if key not in b_index:
            cmp.added.append({**_axes(n_runs[-1], fields, labels), "verdict": "added"})
    cmp.rows.sort(key=lambda r: -r["moved"])
    if kind.name == "profile" and any(r.get("note") == profile.NO_TIMES_NOTE for r in cmp.rows):
        cmp.notes.append("some records carry no raw times (files from before times_s): those cells are compared "
                         "by their medians and judged unsure")
    if vs_torch:
        cmp.notes.append("--vs-torch: each cell's time relative to torch's layer in the same rounds is compared; "
                         "torch's own cells are the reference")
    return cmp


def _experiment_rows(kind: Kind, axes: dict[str, Any], base_runs: list[dict[str, Any]],
                     new_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one experiment group: one per final metric, and its diverged runs."""
    rows = []
    for metric in kind.metrics:
        rows.append({**axes, **experiments.judge_metric(base_runs, new_runs, metric)})
    rows.append({**axes, **experiments.judge_diverged(base_runs, new_runs)})
    base_none = all(record_status(r) != "ok" for r in base_runs)
    new_none = all(record_status(r) != "ok" for r in new_runs)
    if base_none or new_none:
        side = "BASE" if base_none else "NEW"
        for row in rows:
            row.update(verdict="skipped", moved=-1.0, note=f"no run of this group finished in {side}")
    return rows


def compare_files(base: str | os.PathLike, new: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD,
                  confidence: float = CONFIDENCE, vs_torch: bool = False) -> Comparison:
    """Read two results files and compare them (see :func:`compare_results`); a UserError (one
    line) when they hold results of different commands or cannot be read."""
    b_kind, b_res = load(base)
    n_kind, n_res = load(new)
    if b_kind.name != n_kind.name:
        raise UserError(f"{new} holds {n_kind.name} results and {base} {b_kind.name} results: "
                        "compare files of the same command")
    return compare_results(b_kind, b_res, n_res, str(base), str(new), threshold, confidence, vs_torch)


def run(base: str | os.PathLike, news: Sequence[str | os.PathLike], threshold: float = DEFAULT_THRESHOLD,
        confidence: float = CONFIDENCE, vs_torch: bool = False) -> list[Comparison]:
    """``normbench compare BASE NEW [NEW2 ...]`` without the rendering: BASE against each NEW."""
    if not news:
        raise UserError("compare needs BASE and at least one NEW results file")
    if not 0 < confidence < 1:
        raise UserError(f"confidence must lie between 0 and 1, got {confidence}")
    return [compare_files(base, new, threshold, confidence, vs_torch) for new in news]


def failing(comparisons: Iterable[Comparison], fail_on: str | None) -> list[dict[str, Any]]:
    """Every row of ``comparisons`` that trips ``--fail-on`` (none without it)."""
    if fail_on is None:
        return []
    return [r for c in comparisons for r in c.fails(fail_on)]


def comparison_environment(comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """The ``environment`` of a ``normbench.compare/1`` file: this run's (versions, command line,
    time) and what was compared: the files, kind, threshold and environment differences."""
    from normbench.results import environment

    env = environment("cpu")
    env.update(
        kind=comparisons[0].kind.name if comparisons else None,
        base=comparisons[0].base if comparisons else None,
        new=[c.new for c in comparisons],
        threshold=comparisons[0].threshold if comparisons else None,
        vs_torch=comparisons[0].vs_torch if comparisons else False,
        environment_differences={c.new: c.environment_differences for c in comparisons},
    )
    return env


def write_comparison(comparisons: Sequence[Comparison], output: str | os.PathLike, force: bool = False) -> str:
    """Write ``comparisons`` to ``output`` (.json, .jsonl or .csv by suffix; schema
    ``normbench.compare/1``), one record per row; an existing file only with ``force``. Returns
    the path written."""
    from normbench.results import open_results

    kind = comparisons[0].kind if comparisons else KINDS["profile"]
    writer = open_results(output, SCHEMA, comparison_environment(comparisons), ("new", *kind.group_fields),
                          force=force)
    for c in comparisons:
        for record in c.records():
            writer.write(record)
    return str(writer.path)


def read_comparison(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``normbench.compare/1`` file (json, jsonl or csv); a UserError for another
    kind of file or one without rows."""
    from normbench.results import read_results

    res = read_results(path)
    if res.schema is not None and res.schema != SCHEMA:
        raise UserError(f"{path}: holds {res.schema} results, not a comparison ({SCHEMA}); "
                        "give BASE and NEW results files to compare them")
    rows = [r for r in res.records if isinstance(r, dict) and "verdict" in r]
    if res.schema is None and not rows:
        raise UserError(f"{path}: not a comparison file (no rows with a verdict)")
    if not rows:
        raise UserError(f"{path}: the comparison holds no rows")
    return rows
