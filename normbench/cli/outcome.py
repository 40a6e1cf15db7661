"""How a command that ran to its end turns its records into an exit code.

Every command that records cells (``profile``, ``stability``, ``plot equivalence``, ``plot profile
FILE``, ``plot stability FILE``) returns :func:`finish` of its records as its last step, after the
results file, the table and the figures are written. The exit itself happens in one place,
:meth:`normbench.cli._Group.main`, which exits with the value a command returns.

Exit codes: 0 every cell ran (ok or skipped); 1 a cell ended in an error (``status: "error"``), or
a ``--fail-on`` threshold tripped; 2 bad input (a one-line ``Error:``); 130 interrupted.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import click


def error_count(records: Iterable[Mapping[str, Any]]) -> int:
    """How many records ended in an error (``status: "error"``: the cell raised something that
    is neither bad input nor a known reason to skip it)."""
    return sum(1 for r in records if r.get("status") == "error")


def finish(records: Iterable[Mapping[str, Any]], noun: str = "cell", failed: bool = False) -> int:
    """The exit code of a command that has written everything: 1 when a record ended in an error
    (then said on stderr, as the command's last line, so that a CI log shows why it failed) or when
    ``failed`` (a ``--fail-on`` threshold tripped; the caller has said which), else 0. ``noun``
    names what a record is (``cell``, ``run``)."""
    errors = error_count(records)
    if errors:
        what = noun if errors == 1 else f"{noun}s"
        click.echo(f'{errors} {what} ended in an error (status "error" in the results); exit code 1.', err=True)
        return 1
    return 1 if failed else 0
