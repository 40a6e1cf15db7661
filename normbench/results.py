"""Result records, environment metadata, and JSON / JSONL / CSV read and write.

A results file holds ``{"schema": "normbench.<command>/1", "environment": {...}, "records": [...]}``.
Records are streamed: :class:`ResultsWriter` puts every record on disk as it comes, in constant time
(``.jsonl`` appends a line; ``.json`` keeps one record per line and rewrites only its closing
``]}``; ``.csv`` appends a row, and rewrites the file only when a record brings a new column), so
an interrupted run keeps every finished cell and a long run does not slow down.
With ``resume=True`` the records already in the file are kept and :meth:`ResultsWriter.has` tells
the caller which cells to skip. Records are plain dicts of JSON values: every record carries its
axes, ``status`` ("ok" | "skipped" | "error") and ``reason``.
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
