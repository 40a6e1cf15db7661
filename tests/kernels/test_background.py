"""Compilation in the background (normbench.kernels.background): the first call of a layer runs
``analytic`` while the numba kernels compile, with the same numbers; the compile finishes."""

import math
import threading

import pytest
import torch

import oracle
from normbench.kernels import background, fused
from normbench.nn import LpBatchNorm2d

needs_numba = pytest.mark.skipif(not fused.numba_available(), reason="numba is not installed (pip install -e .)")


@pytest.fixture
def background_mode():
    background.set_mode("background")
    yield
    background.set_mode(None)


def test_background_job_runs_off_the_callers_thread_and_finishes(background_mode):
    gate, threads = threading.Event(), []

    def job():
        threads.append(threading.current_thread())
        assert gate.wait(30), "the test never opened the gate"

    key = ("test-job", 1)
    assert background.ready(key, job) is False, "the first call must not wait"
    assert background.status()[key] == "compiling" and key in background.compiling()
    assert background.ready(key, job) is False
    gate.set()
    assert background.wait(key, timeout=30), "the job did not finish"
    assert background.ready(key, job) is True and background.status()[key] == "ready"
    assert threads and threads[0] is not threading.main_thread()
    background.forget(key)
    assert key not in background.status()


def test_a_failed_job_keeps_the_fallback_and_raises_to_whoever_waits(background_mode):
    def job():
        raise RuntimeError("no compiler here")

    key = ("test-failing-job", 2)
    background.ready(key, job)
    assert background.wait(key, timeout=30) is False
    assert background.ready(key, job) is False, "background callers stay on their fallback"
    with pytest.raises(RuntimeError, match="no compiler here"):
        background.ready(key, job, wait=True)
    background.forget(key)


def test_wait_mode_compiles_inline_and_tells_listeners():
    heard = []
    listener = lambda event, key, seconds: heard.append((event, key))  # noqa: E731
    background.add_listener(listener)
    try:
        background.set_mode("wait")
        key = ("test-inline-job", 3)
        ran = []
        assert background.ready(key, lambda: ran.append(threading.current_thread())) is True
        assert ran == [threading.current_thread()]
        assert heard == [("start", key), ("done", key)]
        background.forget(key)
    finally:
        background.remove_listener(listener)
        background.set_mode(None)


@needs_numba
@pytest.mark.parametrize("p,k", [(1.0, None), (math.inf, 3)], ids=["l1", "top3"])
def test_auto_runs_analytic_until_the_kernels_are_compiled_with_the_same_numbers(background_mode, monkeypatch, p, k):
    from normbench.kernels import numba_bn

    key = ("numba_bn", torch.float32)
    fused.kernels_ready(torch.zeros(1), wait=True)  # compiled in this process: restart only the job
    background.forget(key)
    gate, real_warm, launched = threading.Event(), numba_bn.warm, []
    monkeypatch.setattr(numba_bn, "warm", lambda dtype: (gate.wait(60), real_warm(dtype)))
    real_forward = numba_bn.forward
    monkeypatch.setattr(numba_bn, "forward", lambda *a: (launched.append(1), real_forward(*a))[1])

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 3, 5, 6, generator=g) * 2 + 1).requires_grad_()
    gy = torch.randn(x.shape, generator=g)
    xr = x.detach().double().requires_grad_()
    ref = oracle.batch_norm(xr, p=p, k=k)
    (ref_grad,) = torch.autograd.grad(ref, xr, gy.double())
    layer = LpBatchNorm2d(3, p=p, k=k)

    def call():
        y = layer(x)
        (gx,) = torch.autograd.grad(y, x, gy)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx.double(), ref_grad, rtol=1e-4, atol=1e-5)
        return y.detach(), gx

    y_fallback, g_fallback = call()
    assert not launched, "the first call must not wait for numba: analytic runs meanwhile"
    assert background.status()[key] == "compiling"
    gate.set()
    assert background.wait(key, timeout=120), "the background compile did not finish in 2 minutes"
    y_kernel, g_kernel = call()
    assert launched, "once compiled, auto takes the kernels"
    torch.testing.assert_close(y_kernel, y_fallback, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_kernel, g_fallback, rtol=1e-4, atol=1e-5)


@needs_numba
def test_compiling_leaves_torch_threads_as_they_were():
    # compiling a parallel kernel starts numba's thread pool, which reset torch's thread count (a
    # profile run with --threads 1 then timed the fused cells on every core): in a fresh process
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from normbench.kernels import fused_rows\n"
        "fused_rows.kernels_ready(torch.zeros(2, 3), wait=True)\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "1"


@needs_numba
def test_profile_says_when_it_is_compiling():
    from normbench.bench import runner
    from normbench.bench.spec import make_spec

    key = ("numba_rows", torch.float32)
    from normbench.kernels import fused_rows

    fused_rows.kernels_ready(torch.zeros(1), wait=True)
    background.forget(key)  # the next use compiles again (numba has the kernels: quickly)
    labels = []
    spec = make_spec(norm="l1-layernorm", impl="fused", dtype="fp32", shape="8x64", pass_="fwd", mode="train",
                     device="cpu", measure_memory=False, quick=True)
    records = runner.run(spec, on_progress=lambda done, total, label: labels.append(label))
    assert any("compiling numba_rows float32 kernels" in label for label in labels), labels
    fused_records = [r for r in records if r["impl"] == "fused"]
    assert fused_records and fused_records[0]["status"] == "ok"
    assert fused_records[0]["compile_time_s"] is not None, "the compiling call stays out of the samples"
