"""``normbench profile`` under torchrun (gloo on the CPU, loopback), as a user runs it: every rank
times the same cells on its share of the global batch, rank 0 writes; the collectives counted in
each record are those docs/distributed.md lists per p (``normbench.nn.sync.collectives``), the
bytes those of a ring; ``--resume`` skips on every rank what rank 0's file holds; a refused
``--output`` stops every rank with the one-line error instead of leaving the others waiting.
Each launch has a timeout, and the ranks' collectives a shorter one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from normbench.nn.sync import collectives

TIMEOUT_S = 180
NORMS = {"l2": (2.0, None), "l1": (1.0, None), "linf": (math.inf, None), "top3": (math.inf, 3)}
# tiny cells: the test is about what every rank does, not about the times
ARGS = ["profile", "--quick", "--dtype", "fp32", "--norm", ",".join(NORMS), "--pass", "fwd+bwd,fwd", "--no-memory",
        "--quiet"]


def _torchrun(nproc: int, args: list[str], cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", NORMBENCH_DIST_TIMEOUT_S="60")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                           "-m", "normbench", *args], env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd)


def _ring(op: str, nbytes: int, world: int) -> float:
    return (world - 1) * nbytes if op == "all_gather" else 2 * (world - 1) / world * nbytes


def _check_sync_records(records: list[dict], world: int, batch: int, channels: int, norms: list[str],
                        passes: list[str]) -> None:
    by = {(r["norm"], r["impl"], r["pass"]): r for r in records}
    share = batch // world + (batch % world > 0)  # rank 0 holds the larger share
    for pass_ in passes:
        ref = by[("l2", "torch-sync", pass_)]
        assert ref["status"] == "skipped" and "cuda" in ref["reason"]
        for name in norms:
            p, k = NORMS[name]
            r = by[(name, "sync", pass_)]
            assert r["status"] == "ok", r["reason"]
            assert r["world_size"] == world and r["shape"] == f"{batch}x{channels}x5x5"
            assert r["rank_shape"] == f"{share}x{channels}x5x5"
            expected = collectives(p, k, channels, world, backward=pass_ == "fwd+bwd")
            assert r["collective_ops"] == [c["op"] for c in expected]
            assert r["collectives"] == len(expected)
            assert r["contributed_bytes"] == sum(4 * c["values"] for c in expected)  # float32 values
            assert r["sent_bytes"] == pytest.approx(sum(_ring(c["op"], 4 * c["values"], world) for c in expected))
            assert len(r["rank_medians_s"]) == world and all(t > 0 for t in r["rank_medians_s"])
            assert r["comm_s"] > 0 and r["compute_s"] >= 0 and r["time_median_s"] > 0
            local = by[(name, "analytic", pass_)]
            assert local["status"] == "ok" and local["collectives"] == 0 and local["sent_bytes"] == 0


def _one_line_errors(proc: subprocess.CompletedProcess, world: int) -> list[str]:
    """Every rank's error line; none of normbench's frames in a traceback (torchrun prints its
    own launcher's traceback when a child fails)."""
    frames = [line for line in proc.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "/normbench/" in f], proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == world, proc.stderr[-3000:]
    return errors


def test_two_ranks_count_what_each_rank_sends(tmp_path):
    out = tmp_path / "ranks.json"
    proc = _torchrun(2, [*ARGS, "--shape", "8x6x5x5", "--output", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "across 2 ranks" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["environment"]["world_size"] == 2 and doc["environment"]["backend"] == "gloo"
    _check_sync_records(doc["records"], 2, 8, 6, list(NORMS), ["fwd+bwd", "fwd"])


def test_three_unequal_ranks_resume_and_refuse_together(tmp_path):
    out = tmp_path / "ranks.json"
    args = [*ARGS, "--norm", "l2,top3", "--shape", "7x6x5x5", "--pass", "fwd+bwd", "--output", str(out)]
    first = _torchrun(3, args, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    _check_sync_records(records, 3, 7, 6, ["l2", "top3"], ["fwd+bwd"])
    again = _torchrun(3, [*args, "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 cells measured" in again.stderr
    assert json.loads(out.read_text())["records"] == records
    # rank 0 refuses to resume a 3-rank file with 2 ranks; the other rank must stop with it, not wait
    refused = _torchrun(2, [*args, "--resume"], tmp_path)
    assert refused.returncode != 0
    assert all("world_size 3 -> 2" in line for line in _one_line_errors(refused, 2))


def test_model_is_refused_under_torchrun(tmp_path):
    proc = _torchrun(2, ["profile", "--model", "builtin:cnn"], tmp_path)
    assert proc.returncode != 0
    assert all("--model does not run under torchrun" in line for line in _one_line_errors(proc, 2))
