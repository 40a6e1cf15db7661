"""benchmarks/gpu_check.py starts and writes what it should: its --dry-run (the same steps on the
CPU, the Triton kernels under TRITON_INTERPRET=1, small shapes) in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' on Linux x86_64)")


def test_dry_run_writes_one_json_and_one_log(tmp_path):
    out = tmp_path / "check"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run",
                          "--budget-s", "240"], cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["schema"] == "normbench.gpu_check/1"
    assert report["environment"]["dry_run"] is True and report["environment"]["triton_interpret"] == "1"
    assert set(report["steps"]) == {"pytest", "kernels", "profile"}
    assert all(step["status"] == "ok" for step in report["steps"].values()), report["steps"]
    kernels = report["steps"]["kernels"]
    families = {case["case"].split()[0] for case in kernels["cases"]}
    assert families == {"batchnorm", "layernorm", "rmsnorm", "groupnorm"}
    assert kernels["failed"] == 0 and kernels["passed"] == len(kernels["cases"])
    for run_ in report["steps"]["profile"]["runs"].values():
        records = json.loads((out / run_["results"]).read_text())["records"]
        assert {r["impl"] for r in records} == {"torch", "fused"}
    log = (out / "gpu_check.log").read_text()
    assert "every step passed" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log",
                                                     "profile-resnet50-b256.json", "profile-transformer.json"]


def test_without_a_gpu_and_without_dry_run_it_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--dry-run" in run.stderr
