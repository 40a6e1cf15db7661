"""The runner on tiny shapes with a fake timer: records and their schema, streaming to a results
file, resume, interruption, skipped and failed cells. No real timing."""

from __future__ import annotations

import json

import pytest
import torch

from normbench.bench import KEY_FIELDS, RECORD_FIELDS, make_spec, run
from normbench.bench.bytes import pass_bytes
from normbench.bench.impls import IMPLS, Impl, register
from normbench.bench.runner import classify_error
from normbench.bench.timing import TimingSpec
from normbench.results import ResultsWriter, read_results, schema_name


class FakeTimer:
    """Every call 'takes' 1 ms, torch's layers 2 ms: speedups and GB/s become exact."""

    batches = False

    def __init__(self) -> None:
        self.samples = 0

    def wall(self, fn) -> float:
        fn()
        return 0.5

    def sample(self, fn, number: int) -> float:
        fn()
        self.samples += 1
        return self.per_call * number

    per_call = 1e-3


FEW = TimingSpec(warmup_calls=1, min_repeats=3, max_repeats=3, min_time_s=0, floor_repeats=1)


def spec(**kw):
    base = dict(norm="l2,l1,top4", impl="torch,eager,analytic,paper", dtype="fp32", shape="4x3x2x2",
                pass_="fwd,fwd+bwd", device="cpu", measure_memory=False, timing=FEW)
    base.update(kw)
    return make_spec(**base)


def test_records_carry_every_field_and_exact_derived_numbers():
    records = run(spec(), timer=FakeTimer(), peak_gbps=10.0)
    assert len(records) == 2 * (1 + 3 * 3)  # per pass: one torch cell, three norms x three impls
    for r in records:
        assert tuple(r) == RECORD_FIELDS
        assert r["status"] == "ok", r
        assert r["time_median_s"] == pytest.approx(1e-3) and r["time_iqr_s"] == 0.0
        assert r["repeats"] >= 1 and r["threads"] == torch.get_num_threads()
        assert r["gbps"] == pytest.approx(r["bytes"] / 1e-3 / 1e9)
        assert r["sol_fraction"] == pytest.approx(r["gbps"] / 10.0)
        assert r["speedup_vs_torch"] == pytest.approx(1.0)
        assert r["saved_bytes"] is not None and r["compile_time_s"] is None
    fwd_l1 = next(r for r in records if r["norm"] == "l1" and r["pass"] == "fwd" and r["impl"] == "eager")
    from normbench.axes import parse_norm
    assert fwd_l1["bytes"] == pass_bytes(parse_norm("l1"), (4, 3, 2, 2), torch.float32, "fwd", "train")
    assert fwd_l1["shape"] == "4x3x2x2" and fwd_l1["dtype"] == "fp32" and fwd_l1["mode"] == "train"


def test_speedup_is_torch_time_over_this_time():
    class SlowTorch(FakeTimer):
        torch_now = False

        def sample(self, fn, number):
            fn()
            return number * (4e-3 if self.torch_now else 1e-3)

    timer = SlowTorch()
    torch_entry = IMPLS["torch"]

    def build_torch(norm, shape):  # tells the fake timer which layer it is timing
        timer.torch_now = True
        return torch_entry.build(norm, shape)

    def build_eager(norm, shape):
        timer.torch_now = False
        return IMPLS["eager"].build(norm, shape)

    emitted = []
    register(Impl("eager_test", "test", build_eager))
    IMPLS["torch"] = Impl("torch", "test", build_torch)
    try:
        records = run(spec(norm="l1", impl="eager_test", pass_="fwd"), timer=timer, peak_gbps=10.0,
                      on_record=emitted.append)
    finally:
        IMPLS["torch"] = torch_entry
        IMPLS.pop("eager_test")
    assert [r["impl"] for r in emitted] == ["eager_test"]  # the torch reference is measured, not emitted
    assert records[0]["speedup_vs_torch"] == pytest.approx(4.0)


def test_cells_that_cannot_run_are_skipped_with_a_reason_and_the_run_goes_on():
    s = make_spec(norm="top100,layernorm", impl="paper,eager", dtype="fp32,fp8_e4m3", shape="4x3x2x2,6x5",
                  pass_="fwd", memory_format="channels_last", device="cpu", measure_memory=False, timing=FEW)
    records = run(s, timer=FakeTimer(), peak_gbps=10.0)
    reasons = {(r["norm"], r["impl"], r["dtype"], r["shape"]): (r["status"], r["reason"]) for r in records}
    assert reasons[("top100", "eager", "fp32", "4x3x2x2")][0] == "skipped"
    assert "top-100" in reasons[("top100", "eager", "fp32", "4x3x2x2")][1]
    assert reasons[("layernorm", "paper", "fp32", "4x3x2x2")] == ("skipped", "the paper's code has batch-norm layers only")
    assert "channels_last" in reasons[("layernorm", "eager", "fp32", "6x5")][1]
    assert reasons[("layernorm", "eager", "fp8_e4m3", "4x3x2x2")][0] == "skipped"  # no fp8 arithmetic
    ok = [r for r in records if r["status"] == "ok"]
    assert ok and all(r["memory_format"] == "channels_last" for r in ok)
    for r in records:
        if r["status"] != "ok":
            assert r["time_median_s"] is None and r["reason"]


def test_a_failing_implementation_is_an_error_record_not_a_crash():
    def broken(norm, shape):
        raise ZeroDivisionError("bug in the layer")

    register(Impl("broken_test", "test", broken))
    try:
        records = run(spec(norm="l1", impl="broken_test,eager", pass_="fwd"), timer=FakeTimer(), peak_gbps=10.0)
    finally:
        IMPLS.pop("broken_test")
    status = {r["impl"]: (r["status"], r["reason"]) for r in records}
    assert status["broken_test"] == ("error", "ZeroDivisionError: bug in the layer")
    assert status["eager"][0] == "ok"


def test_error_classification():
    assert classify_error(torch.OutOfMemoryError("CUDA out of memory. Tried"))[0] == "skipped"
    assert classify_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))[0] == "skipped"
    assert classify_error(RuntimeError('"addmm" not implemented for \'Float8_e4m3fn\''))[0] == "skipped"
    assert classify_error(ValueError("shape mismatch"))[0] == "error"


def _writer(path, resume=False):
    return ResultsWriter(path, schema_name("profile"), {"device": "cpu"}, KEY_FIELDS, resume=resume)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_streaming_interrupt_and_resume(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    s = spec()
    total = len(s.cells("cpu"))
    writer = _writer(path)
    seen = []

    def write_then_maybe_stop(record):
        writer.write(record)
        seen.append(record)
        on_disk = read_results(path).records
        assert len(on_disk) == len(seen)  # streamed: on disk as soon as it finished
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(s, on_record=write_then_maybe_stop, timer=FakeTimer(), peak_gbps=10.0)
    first = read_results(path, schema=schema_name("profile") if suffix != ".csv" else None)
    assert len(first.records) == 4

    writer = _writer(path, resume=True)
    timer = FakeTimer()
    new = run(s, on_record=writer.write, skip=writer.has, previous=writer.records, timer=timer, peak_gbps=10.0)
    assert len(new) == total - 4
    done = read_results(path).records
    assert len(done) == total
    keys = {tuple(json.dumps(r[f]) for f in KEY_FIELDS) for r in done}
    assert len(keys) == total  # every cell once
    # resumed cells still get their speedup from the torch times already in the file
    assert all(r["speedup_vs_torch"] == pytest.approx(1.0) for r in new)


def test_threads_option_is_applied_and_restored():
    before = torch.get_num_threads()
    records = run(spec(norm="l2", impl="eager", pass_="fwd", threads=1), timer=FakeTimer(), peak_gbps=10.0)
    assert records[0]["threads"] == 1
    assert torch.get_num_threads() == before


def test_a_skipped_cell_measures_nothing_not_even_its_torch_reference():
    timer = FakeTimer()
    records = run(spec(norm="layernorm", impl="paper", shape="6x5"), timer=timer, peak_gbps=10.0)
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    assert timer.samples == 0


def test_a_cell_too_large_for_free_memory_is_skipped_before_allocating(monkeypatch):
    import normbench.bench.runner as runner

    monkeypatch.setattr(runner, "free_memory", lambda device: 1000)
    records = run(spec(norm="l1", impl="eager", pass_="fwd"), timer=FakeTimer(), peak_gbps=10.0)
    assert records[0]["status"] == "skipped" and records[0]["reason"].startswith("out of memory: would need")
