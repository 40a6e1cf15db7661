"""``plot equivalence`` under torchrun (2 processes, gloo on the CPU, loopback) records what one
process records on the same global batch and seed, to float32 rounding (docs/distributed.md
states the tolerance), and rank 0 alone writes."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from normbench.distributed import shard_bounds

# a reduced --quick: one seed, two epochs, every regime (BN of each p, WN and bounded WN with their
# mean-only batch-norm, the corrected and norm-schedule regimes that follow the WD run's norms)
ARGS = ["plot", "equivalence", "--quick", "--seeds", "0", "--epochs", "2", "--quiet"]
TIMEOUT_S = 240
# relative tolerances, by recorded field (float32 training: the ranks sum in another order); L-inf
# amplifies rounding (its gradient follows the one largest deviation, which a near-tie can move)
RTOL = {"angular_update": 5e-2, "default": 1e-3}
LINF_RTOL = 1e-2
ACC_ATOL = 0.01  # accuracies: at most 1% of the images classified differently


def test_shard_bounds_cover_the_batch_in_order():
    for batch in (0, 1, 5, 32):
        for ranks in (1, 2, 3, 7):
            bounds = [shard_bounds(batch, ranks, r) for r in range(ranks)]
            assert bounds[0][0] == 0 and bounds[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _run(cmd: list[str], out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", NORMBENCH_DIST_TIMEOUT_S="60")
    proc = subprocess.run([*cmd, *ARGS, "--output-dir", str(out)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _compare(a, b, path: str, failures: list[str], rtol: float) -> None:
    if isinstance(a, dict):
        for key in a:
            if key not in ("train_seconds", "cached", "config", "config_hash"):
                _compare(a[key], b[key], f"{path}.{key}", failures, rtol)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}[{i}]", failures, rtol)
    elif isinstance(a, float) and isinstance(b, float):
        field = re.sub(r"\[\d+\]", "", path).rsplit(".", 1)[-1]
        if field.endswith("acc"):
            ok = abs(a - b) <= ACC_ATOL
        else:
            ok = math.isclose(a, b, rel_tol=max(rtol, RTOL.get(field, RTOL["default"])), abs_tol=1e-12)
        if not ok:
            failures.append(f"{path}: one process {a!r}, two {b!r}")
    else:
        assert a == b, (path, a, b)


def test_two_processes_record_what_one_does(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "normbench"], one)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "normbench"],
         two)
    a = json.loads((one / "equivalence.json").read_text())["records"]
    b = json.loads((two / "equivalence.json").read_text())["records"]
    assert [r["regime"] for r in a] == [r["regime"] for r in b] and len(a) == 10
    failures: list[str] = []
    for ra, rb in zip(a, b):
        assert ra["status"] == rb["status"] == "ok" and not rb["diverged"]
        assert "world_size" not in ra["config"] and rb["config"]["world_size"] == 2
        _compare(ra, rb, ra["regime"], failures, LINF_RTOL if ra["regime"] == "batch_norm_linf" else 0.0)
    assert not failures, "\n".join(failures[:20])
    # rank 0 alone wrote: one results file and one cache entry per distinct run
    assert sorted(p.name for p in two.glob("*.json")) == ["equivalence.json", "scale_invariance.json"]
    assert len(list((two / "cache" / "equivalence").glob("*.json"))) == len({r["config_hash"] for r in b})
    # drawn again, the cache answers (every rank follows rank 0's reads): nothing retrained
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "normbench"],
         two)
    c = json.loads((two / "equivalence.json").read_text())["records"]
    assert all(r["cached"] for r in c) and [r["final"] for r in c] == [r["final"] for r in b]


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
