"""The kinds of results files ``normbench compare`` reads, one table entry each: the fields that
identify a record (matched between two files), the verdicts a cell can get, and for the training
experiments the final metrics compared over seeds. A new kind of results is one entry here (and,
for a new way of judging, one module beside this one).

:func:`load` reads a results file with :func:`normbench.results.read_results` (json only, never
pickle) and tells its kind from its schema, or, for a CSV file (which has no schema line), from
the fields its records carry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from normbench.bench.spec import KEY_FIELDS as PROFILE_KEY_FIELDS
from normbench.compare import experiments, profile, stability
from normbench.errors import UserError
from normbench.experiments.halfprec import KEY_FIELDS as HALFPREC_KEY_FIELDS
from normbench.numerics.runner import KEY_FIELDS as STABILITY_KEY_FIELDS
from normbench.results import Results, read_results, schema_name

# Verdicts every kind can also give: a cell measured in BASE that ended in an error in NEW, and a
# cell that cannot be compared because one side was skipped (or failed in BASE).
COMMON_VERDICTS = ("failed", "skipped")
# The verdicts that count as a regression, per --fail-on value.
FAIL_ON = {
    "slower": ("slower",),
    "unstable": ("unstable",),
    "any": ("slower", "unstable", "worse", "failed"),
}


@dataclass(frozen=True)
class Kind:
    """One kind of results file: ``key_fields`` identify a record; ``verdicts`` are those its
    cells get, in the order the summary counts them; ``metrics`` (experiments only) the final
    metrics compared over seeds; ``detect`` the fields whose presence in every record marks a
    CSV file (no schema) as this kind."""

    name: str
    key_fields: tuple[str, ...]
    verdicts: tuple[str, ...]
    detect: tuple[str, ...]
    metrics: tuple[str, ...] = ()

    @property
    def schema(self) -> str:
        return schema_name(self.name)

    @property
    def is_experiment(self) -> bool:
        """Runs over seeds, compared as groups (mean ± std) rather than record by record."""
        return bool(self.metrics)

    @property
    def group_fields(self) -> tuple[str, ...]:
        """The fields that identify a row of the comparison: a record's key, without the seed for
        experiments (their seeds are pooled)."""
        return tuple(f for f in self.key_fields if f != "seed") if self.is_experiment else self.key_fields


# In this order a CSV file (no schema) is told apart by its fields: the most specific first.
KINDS: dict[str, Kind] = {
    "profile": Kind("profile", tuple(PROFILE_KEY_FIELDS), profile.VERDICTS, ("time_median_s",)),
    "stability": Kind("stability", tuple(STABILITY_KEY_FIELDS), stability.VERDICTS, ("err_ulps",)),
    "halfprec": Kind("halfprec", HALFPREC_KEY_FIELDS,
                     experiments.VERDICTS, ("scale", "storage", "final"), ("test_acc", "train_loss")),
    "equivalence": Kind("equivalence", ("protocol", "regime", "seed"), experiments.VERDICTS,
                        ("protocol", "final"), ("test_acc", "test_loss", "train_loss")),
}


def kind_of(res: Results, path: str | os.PathLike) -> Kind:
    """The kind of a results file read into ``res``: by its schema, or for a file without one
    (CSV) by its records' fields; a UserError for anything compare cannot read."""
    names = ", ".join(KINDS)
    if res.schema is not None:
        for kind in KINDS.values():
            if res.schema == kind.schema:
                return kind
        raise UserError(f"{path}: holds {res.schema} results; compare reads results of {names}")
    measured = [r for r in res.records if isinstance(r, dict)]
    if not measured:
        raise UserError(f"{path}: no records to compare")
    for kind in KINDS.values():
        if all(any(f in r for r in measured) for f in kind.detect):
            return kind
    raise UserError(f"{path}: cannot tell which command wrote it (records of {names} expected)")


def load(path: str | os.PathLike) -> tuple[Kind, Results]:
    """Read a results file (json, jsonl or csv) and tell its kind; a UserError for a missing,
    unreadable or foreign file."""
    res = read_results(path)
    kind = kind_of(res, path)
    bad = [r for r in res.records if not isinstance(r, dict)]
    if bad:
        raise UserError(f"{path}: records must be JSON objects, found {type(bad[0]).__name__}")
    return kind, res


def record_status(record: dict[str, Any]) -> str:
    """A record's status, ``ok`` when it does not say (experiments' older records)."""
    return str(record.get("status") or "ok")
