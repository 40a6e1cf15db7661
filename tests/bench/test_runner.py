"""The runner on tiny shapes with a fake timer: records and their schema, streaming to a results
file, resume, interruption, skipped and failed cells. No real timing."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from normbench.bench import KEY_FIELDS, RECORD_FIELDS, make_spec, run
from normbench.bench.bytes import pass_bytes
from normbench.bench.impls import IMPLS, Impl, register
from normbench.bench.runner import classify_error
from normbench.bench.timing import CpuTimer, TimingSpec
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
        assert r["times_s"] == [pytest.approx(1e-3)] * r["repeats"]  # every repeat kept
        assert statistics.median(r["times_s"]) == r["time_median_s"]
        assert r["cache"] == "cold" and r["input_copies"] >= 2
    fwd_l1 = next(r for r in records if r["norm"] == "l1" and r["pass"] == "fwd" and r["impl"] == "eager")
    from normbench.axes import parse_norm
    assert fwd_l1["bytes"] == pass_bytes(parse_norm("l1"), (4, 3, 2, 2), torch.float32, "fwd", "train")
    assert fwd_l1["shape"] == "4x3x2x2" and fwd_l1["dtype"] == "fp32" and fwd_l1["mode"] == "train"


class ClockLayer(torch.nn.Module):
    """A layer whose every call 'takes' ``cost`` seconds times the machine's load at that moment
    on a fake clock, and logs its name and the storage of its input."""

    def __init__(self, name, cost, clock, log):
        super().__init__()
        self.name, self.cost, self.clock, self.log = name, cost, clock, log

    def forward(self, x):
        self.log.append((self.name, x.untyped_storage().data_ptr()))
        self.clock.now += self.cost * self.clock.load()
        return _LogBackward.apply(x, self.log, self.name + " bwd")


class _LogBackward(torch.autograd.Function):
    """Identity that logs, on every backward through it, the storage of the input it saw."""

    @staticmethod
    def forward(ctx, x, log, name):
        ctx.entry, ctx.log = (name, x.untyped_storage().data_ptr()), log
        y = x * 1.0
        log.append((name.replace(" bwd", " out"), y.untyped_storage().data_ptr()))
        return y

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.entry)
        return grad, None, None


class DriftingClock:
    """A fake clock on a machine whose load grows with time (``drift`` per second), as when a
    neighbour's job starts up: every call takes longer the later it runs."""

    def __init__(self, drift=0.0):
        self.start = self.now = 100.0
        self.drift = drift

    def __call__(self):
        return self.now

    def load(self):
        return 1.0 + self.drift * (self.now - self.start)


def _clock_impls(clock, log, torch_cost=4e-3, cand_cost=1e-3):
    """Register ``cand_test`` (cand_cost per call) and replace ``torch`` (torch_cost); returns an
    undo callable."""
    torch_entry = IMPLS["torch"]
    IMPLS["torch"] = Impl("torch", "test", lambda norm, shape: ClockLayer("torch", torch_cost, clock, log))
    register(Impl("cand_test", "test", lambda norm, shape: ClockLayer("cand", cand_cost, clock, log)))

    def undo():
        IMPLS["torch"] = torch_entry
        IMPLS.pop("cand_test")
    return undo


ROUNDS = TimingSpec(warmup_calls=1, min_repeats=10, max_repeats=10, min_time_s=0, min_block_s=0, floor_repeats=1)


def test_speedup_is_torch_time_over_this_time_from_the_same_rounds():
    clock, log = DriftingClock(), []
    undo = _clock_impls(clock, log)
    emitted = []
    try:
        records = run(spec(norm="l1", impl="cand_test", pass_="fwd", timing=ROUNDS), timer=CpuTimer(clock),
                      peak_gbps=10.0, on_record=emitted.append, llc_bytes=64)
    finally:
        undo()
    assert [r["impl"] for r in emitted] == ["cand_test"]  # the torch reference is measured, not emitted
    r = records[0]
    assert r["speedup_vs_torch"] == pytest.approx(4.0)
    assert len(r["torch_times_s"]) == len(r["times_s"]) == r["repeats"] == 10  # the same rounds
    assert r["speedup_vs_torch"] == pytest.approx(statistics.median(r["torch_times_s"]) / statistics.median(r["times_s"]))
    assert r["interleaved_with"] == "l2 torch"


def test_torch_and_the_candidate_alternate_in_the_same_rounds():
    clock, log = DriftingClock(), []
    undo = _clock_impls(clock, log)
    try:
        records = run(spec(norm="l1", impl="torch,cand_test", pass_="fwd", timing=ROUNDS), timer=CpuTimer(clock),
                      peak_gbps=10.0, llc_bytes=64)
    finally:
        undo()
    names = [name for name, _ in log if name in ("torch", "cand")]  # the forward calls
    # warm-up: each once; then 10 rounds, one sample of each, the order reversed every other round
    # (ABBA); then one forward each for the saved bytes
    assert names[:2] == ["torch", "cand"]
    assert names[2:2 + 20] == ["torch", "cand", "cand", "torch"] * 5
    torch_rec, cand_rec = records
    assert torch_rec["impl"] == "torch" and torch_rec["interleaved_with"] == "l1 cand_test"
    assert cand_rec["torch_times_s"] == torch_rec["times_s"]  # torch's record is those same rounds, timed once


def test_a_drifting_machine_does_not_move_the_speedup():
    """The load grows 3x over the run. Timed in the same rounds, torch's layer and the candidate
    see the same load and the speedup stays 4 within 5%; timed one after the other (the old
    scheme, reproduced here with profile_cell), the candidate runs later, at a higher load, and
    its speedup comes out 2.2."""
    from normbench.bench.runner import profile_cell

    clock, log = DriftingClock(drift=20.0), []
    undo = _clock_impls(clock, log)
    try:
        s = spec(norm="l1", impl="torch,cand_test", pass_="fwd", timing=ROUNDS)
        interleaved = run(s, timer=CpuTimer(clock), peak_gbps=10.0, llc_bytes=64)[1]["speedup_vs_torch"]
        clock.now = clock.start
        torch_cell, cand_cell = s.cells("cpu")
        ref = profile_cell(torch_cell, ROUNDS, CpuTimer(clock), 10.0, measure_memory=False, llc_bytes=64)
        apart = profile_cell(cand_cell, ROUNDS, CpuTimer(clock), 10.0, ref["time_median_s"], measure_memory=False,
                             llc_bytes=64)["speedup_vs_torch"]
    finally:
        undo()
    assert interleaved == pytest.approx(4.0, rel=0.05)
    assert not apart == pytest.approx(4.0, rel=0.3)


@pytest.mark.parametrize("pass_, copies", [("fwd", 8), ("fwd+bwd", 4), ("bwd", 4)])
def test_cold_cache_rotates_copies_that_exceed_the_cache(pass_, copies):
    """A fake 1 MiB last-level cache and a 256 KiB input: every timed call reads another copy,
    and the copies (input, and dy for a backward) hold twice the cache."""
    clock, log = DriftingClock(), []
    undo = _clock_impls(clock, log)
    try:
        records = run(spec(norm="l1", impl="cand_test", pass_=pass_, shape="16x16x16x16", timing=ROUNDS),
                      timer=CpuTimer(clock), peak_gbps=10.0, llc_bytes=1 << 20)
    finally:
        undo()
    r = records[0]
    x_bytes = 16 ** 4 * 4
    assert r["cache"] == "cold" and r["input_copies"] == copies
    assert r["input_copies"] * x_bytes * (1 if pass_ == "fwd" else 2) >= 2 * (1 << 20)
    # the calls the timer made (backward ones for passes with a backward), after the first: the samples
    timed = [ptr for name, ptr in log if name == ("cand" if pass_ == "fwd" else "cand bwd")][1:1 + 10]
    assert len(set(timed)) == copies and all(a != b for a, b in zip(timed, timed[1:]))
    if pass_ == "fwd":  # each copy holds its last output: no call writes where the one before it did
        out = [ptr for name, ptr in log if name == "cand out"][1:1 + 10]
        assert len(set(out)) >= copies and all(a != b for a, b in zip(out, out[1:]))


def test_warm_cache_times_one_copy_and_says_so():
    clock, log = DriftingClock(), []
    undo = _clock_impls(clock, log)
    try:
        records = run(spec(norm="l1", impl="cand_test", pass_="fwd", shape="16x16x16x16", timing=ROUNDS, cache="warm"),
                      timer=CpuTimer(clock), peak_gbps=10.0, llc_bytes=1 << 20)
    finally:
        undo()
    assert records[0]["cache"] == "warm" and records[0]["input_copies"] == 1
    assert len({ptr for name, ptr in log if name == "cand"}) == 1


def test_inputs_too_small_for_enough_copies_are_evicted_before_every_sample(monkeypatch):
    import normbench.bench.runner as runner

    evictions = []

    class CountingEvictor:
        def __init__(self, nbytes, device="cpu"):
            self.nbytes = nbytes

        def __call__(self):
            evictions.append(self.nbytes)

    monkeypatch.setattr(runner, "Evictor", CountingEvictor)
    timer = FakeTimer()
    records = run(spec(norm="l1", impl="eager", pass_="fwd"), timer=timer, peak_gbps=10.0, llc_bytes=1 << 30)
    r = next(r for r in records if r["impl"] == "eager")
    assert r["input_copies"] == runner.MAX_COPIES  # 192-byte inputs: the cap, far short of 2 GiB
    assert evictions and set(evictions) == {2 << 30}
    assert len(evictions) == timer.samples  # torch's samples and the candidate's, each after an eviction


def test_rotation_copies():
    from normbench.bench.runner import MAX_COPIES, rotation_copies

    llc = 32 << 20
    assert rotation_copies(25 << 20, llc) == (3, False)  # 75 MiB >= 64 MiB
    assert rotation_copies(200 << 20, llc) == (2, False)  # above the cache: at least two
    assert rotation_copies(1 << 10, llc) == (MAX_COPIES, True)  # capped: an eviction covers the rest
    assert rotation_copies(25 << 20, llc, spare_bytes=30 << 20) == (2, True)  # memory for one more copy only
    assert rotation_copies(25 << 20, llc, spare_bytes=0) == (1, True)


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
    new = run(s, on_record=writer.write, skip=writer.has, timer=timer, peak_gbps=10.0)
    assert len(new) == total - 4
    done = read_results(path).records
    assert len(done) == total
    for r in done:  # every repeat's time read back as a list, in every format
        assert isinstance(r["times_s"], list) and len(r["times_s"]) == r["repeats"]
        assert statistics.median(r["times_s"]) == r["time_median_s"]
    keys = {tuple(json.dumps(r[f]) for f in KEY_FIELDS) for r in done}
    assert len(keys) == total  # every cell once
    # resumed cells get their speedup from torch's layer timed again in their own rounds
    assert all(r["speedup_vs_torch"] == pytest.approx(1.0) for r in new)
    assert all(r["torch_times_s"] for r in new if r["impl"] != "torch")


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


@pytest.mark.parametrize("shape, mode", [("1x1", "train"), ("1x32x1", "eval")])
def test_torch_group_norm_on_one_value_per_group_is_skipped_not_an_error(shape, mode):
    """torch's GroupNorm refuses a batch with one value per group (in eval mode too); the cell
    cannot run, which is a skip with its reason (it was an error record: exit code 1)."""
    s = make_spec(norm="groupnorm", impl="torch,eager", dtype="fp32", shape=shape, pass_="fwd", mode=mode,
                  device="cpu", measure_memory=False, timing=FEW)
    records = {r["impl"]: r for r in run(s, timer=FakeTimer(), peak_gbps=10.0)}
    assert records["torch"]["status"] == "skipped" and "GroupNorm" in records["torch"]["reason"]
    assert records["eager"]["status"] == "ok"  # normbench's layer takes it
