"""``normbench compare``: match two results files of one command and judge what moved.

Usable from a notebook::

    from normbench.compare import compare_files
    cmp = compare_files("before.json", "after.json", threshold=0.05)
    print(cmp.summary())            # "3 slower, 1 faster, 40 same, 2 unsure"
    for row in cmp.rows: ...        # most moved first

- :mod:`~normbench.compare.kinds`: the table of results kinds (key fields, verdicts, metrics);
- :mod:`~normbench.compare.core`: loading, matching, added / removed, the :class:`Comparison`;
- :mod:`~normbench.compare.profile`, :mod:`~normbench.compare.stability`,
  :mod:`~normbench.compare.experiments`: how a matched cell of each kind is judged;
- :mod:`~normbench.compare.stats`: the ratio's interval (Hodges-Lehmann / Mann-Whitney) and
  mean / std over seeds.
"""

from normbench.compare.core import (
    DEFAULT_THRESHOLD,
    SCHEMA,
    Comparison,
    compare_files,
    compare_results,
    failing,
    parse_threshold,
    read_comparison,
    run,
    write_comparison,
)
from normbench.compare.kinds import FAIL_ON, KINDS, Kind, load

__all__ = [
    "DEFAULT_THRESHOLD", "SCHEMA", "Comparison", "compare_files", "compare_results", "failing", "parse_threshold",
    "read_comparison", "run", "write_comparison", "FAIL_ON", "KINDS", "Kind", "load",
]
