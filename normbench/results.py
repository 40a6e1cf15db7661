"""Result records, environment metadata, and JSON / JSONL / CSV read and write.

A results file holds ``{"schema": "normbench.<command>/1", "environment": {...}, "records": [...]}``.
Records are streamed: :class:`ResultsWriter` puts every record on disk as it comes, in constant time
(``.jsonl`` appends a line; ``.json`` keeps one record per line and rewrites only its closing
``]}``; ``.csv`` appends a row, and rewrites the file only when a record brings a new column), so
an interrupted run keeps every finished cell and a long run does not slow down.
With ``resume=True`` the records already in the file are kept and :meth:`ResultsWriter.has` tells
the caller which cells to skip. Records are plain dicts of JSON values: every record carries its
axes, ``status`` ("ok" | "skipped" | "error") and ``reason``. In CSV a list or dict value (a
profile record's ``times_s``, a stability record's ``case``) is one JSON-encoded cell, read back
as the list or dict.

The rules of the commands' ``--output``, ``--resume`` and ``--force`` live here, for every
command alike (:func:`check_output_options`, :func:`open_results`): an existing file is never
overwritten without ``--force``, and ``--resume`` only adds to a file measured on the same device,
torch version and thread count (and, for a profile, cache mode).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from normbench import __version__
from normbench.errors import UserError

SCHEMA_VERSION = 1
FORMATS = (".json", ".jsonl", ".csv")
STATUSES = ("ok", "skipped", "error")


def schema_name(command: str) -> str:
    """The schema tag of a command's results file, e.g. ``normbench.profile/1``."""
    return f"normbench.{command}/{SCHEMA_VERSION}"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu", argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and how a run happened: versions, device, threads, time and the exact command line."""
    import torch

    env: dict[str, Any] = {
        "normbench_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv if argv is None else argv),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        env["device_name"] = props.name
        env["cuda_version"] = torch.version.cuda
        env["device_memory_bytes"] = props.total_memory
    else:
        env["device_name"] = env["cpu_model"]
    return env


def results_format(path: str | os.PathLike) -> str:
    """The format a path asks for by its suffix; a UserError for an unknown one."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: results files end in {', '.join(FORMATS)}, not {suffix or 'nothing'!r}")
    return suffix


@dataclass
class Results:
    """A results file in memory."""

    schema: str | None
    environment: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple, bool)):
        return json.dumps(value)
    return str(value)


def _parse_csv_value(text: str) -> Any:
    if text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_results(path: str | os.PathLike, schema: str | None = None) -> Results:
    """Read a results file of any supported format (never unpickles anything).

    With ``schema`` given, a file of another schema is a UserError.
    """
    fmt = results_format(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read results file ({exc.strerror})") from None
    try:
        if fmt == ".json":
            doc = json.loads(text) if text.strip() else {}
            if not isinstance(doc, dict) or not isinstance(doc.get("records", []), list):
                raise ValueError("not a normbench results document")
            res = Results(doc.get("schema"), doc.get("environment", {}), doc.get("records", []))
        elif fmt == ".jsonl":
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            if lines and "schema" in lines[0] and "records" not in lines[0] and "status" not in lines[0]:
                head, lines = lines[0], lines[1:]
            else:
                head = {}
            res = Results(head.get("schema"), head.get("environment", {}), lines)
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
            records = [{k: _parse_csv_value(v) for k, v in row.items()} for row in rows]
            res = Results(schema, {}, records)
    except ValueError as exc:
        raise UserError(f"{path}: not a readable {fmt} results file ({exc})") from None
    if schema is not None and res.schema is not None and res.schema != schema:
        raise UserError(f"{path}: holds {res.schema} results, expected {schema}")
    return res


def record_key(record: dict[str, Any], fields: Iterable[str]) -> tuple[str, ...]:
    """A hashable identity of a cell: its axis values, JSON-encoded so that files of every
    format (CSV reads back JSON-parsed values) give the same key."""
    return tuple(json.dumps(record.get(f), sort_keys=True) for f in fields)


class ResultsWriter:
    """Streams records to a results file; every :meth:`write` leaves a complete, readable file.

    ``key_fields`` name the axes that identify a cell. With ``resume=True`` the file's records
    are kept (except ``status: "error"`` ones, which are run again) and :meth:`has` reports them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        schema: str,
        environment: dict[str, Any],
        key_fields: Sequence[str],
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self.format = results_format(self.path)
        self.schema = schema
        self.environment = environment
        self.key_fields = tuple(key_fields)
        self.records: list[dict[str, Any]] = []
        self._columns: list[str] = []
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            old = read_results(self.path, schema=schema)
            self.records = [r for r in old.records if r.get("status") != "error"]
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done = {record_key(r, self.key_fields) for r in self.records}
        self._rewrite()

    def has(self, cell: dict[str, Any]) -> bool:
        """Whether a record with these axis values is already in the file."""
        return record_key(cell, self.key_fields) in self._done

    def write(self, record: dict[str, Any]) -> None:
        """Add one finished record and put it on disk now."""
        self.records.append(record)
        self._done.add(record_key(record, self.key_fields))
        if self.format == ".jsonl":
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        elif self.format == ".json":
            with self.path.open("r+b") as f:
                f.seek(-len(_JSON_TRAILER), os.SEEK_END)
                sep = ",\n" if len(self.records) > 1 else "\n"
                f.write((sep + json.dumps(record) + _JSON_TRAILER).encode())
                f.truncate()
        elif set(record) <= set(self._columns):
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._columns).writerow(
                    {k: _csv_value(record.get(k)) for k in self._columns})
        else:
            self._rewrite()

    def _rewrite(self) -> None:
        """Write the whole file atomically (a temporary file, then a rename)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            if self.format == ".json":
                head = json.dumps({"schema": self.schema, "environment": self.environment})[:-1]
                f.write(head + ', "records": [')
                f.write(",".join("\n" + json.dumps(r) for r in self.records) + _JSON_TRAILER)
            elif self.format == ".jsonl":
                f.write(json.dumps({"schema": self.schema, "environment": self.environment}) + "\n")
                for r in self.records:
                    f.write(json.dumps(r) + "\n")
            else:
                self._columns = []
                for r in self.records:
                    self._columns.extend(k for k in r if k not in self._columns)
                writer = csv.DictWriter(f, fieldnames=self._columns)
                writer.writeheader()
                for r in self.records:
                    writer.writerow({k: _csv_value(r.get(k)) for k in self._columns})
        os.replace(tmp, self.path)


_JSON_TRAILER = "\n]}\n"


# Environment fields that must match for --resume to add records to a file: records measured
# under different values would sit side by side as if comparable.
RESUME_FIELDS = ("device", "torch_version", "threads")

_opened: list[Path] = []  # results files opened by open_results in this invocation


def check_output_options(output: str | os.PathLike | None, resume: bool = False, force: bool = False) -> None:
    """The checks of ``--output``/``--resume``/``--force`` that need no measurement, so that a
    command refuses before it spends any time: a UserError (one line) for ``--resume`` or
    ``--force`` without ``--output``, both at once, an unknown suffix, or an existing non-empty
    file without either flag."""
    if resume and force:
        raise UserError("give --resume (keep the file's finished cells) or --force (overwrite it), not both")
    if resume and not output:
        raise UserError("--resume needs --output (the file whose finished cells to keep)")
    if force and not output:
        raise UserError("--force needs --output (the file to overwrite)")
    if not output:
        return
    results_format(output)
    path = Path(output)
    if not resume and not force and path.exists() and (path.is_dir() or path.stat().st_size > 0):
        raise UserError(f"{path} exists: pass --resume to keep its finished cells and run the others, "
                        "or --force to overwrite it")


def environment_differences(old: Results, env: dict[str, Any], fields: Sequence[str] = RESUME_FIELDS) -> list[str]:
    """``field old -> new`` for each of ``fields`` whose value in the file differs from ``env``.
    A file without an environment (CSV) is checked on the records' own fields where they have
    them (``device``, ``threads``); a field the file does not record is not checked."""
    out = []
    for f in fields:
        if f not in env:
            continue
        if f in old.environment:
            values = [old.environment[f]]
        else:
            values = list(dict.fromkeys(json.dumps(r[f]) for r in old.records if r.get(f) is not None))
            values = [json.loads(v) for v in values]
        for value in values:
            if str(value) != str(env[f]):
                out.append(f"{f} {value} -> {env[f]}")
                break
    return out


def open_results(
    output: str | os.PathLike,
    schema: str,
    environment: dict[str, Any],
    key_fields: Sequence[str],
    *,
    resume: bool = False,
    force: bool = False,
    match: Sequence[str] = RESUME_FIELDS,
) -> "ResultsWriter":
    """A :class:`ResultsWriter` for a command's ``--output``, after its rules: the checks of
    :func:`check_output_options`, and with ``resume`` a file whose environment differs from this
    run's in any field of ``match`` is refused, the differences named in one line. The path is
    remembered for the CLI's message on Ctrl-C (:func:`opened_results`)."""
    check_output_options(output, resume, force)
    path = Path(output)
    if resume and path.exists() and path.stat().st_size > 0:
        old = read_results(path, schema=schema)
        diff = environment_differences(old, environment, match)
        if diff:
            raise UserError(f"{path}: cannot resume, it was measured with {', '.join(diff)} "
                            "(match them, or pass --force to overwrite the file)")
    writer = ResultsWriter(path, schema, environment, key_fields, resume=resume)
    _opened.append(writer.path)
    return writer


def opened_results() -> tuple[Path, ...]:
    """The results files :func:`open_results` opened since :func:`forget_opened_results`."""
    return tuple(_opened)


def forget_opened_results() -> None:
    """Start a new invocation: no results file opened yet."""
    _opened.clear()

