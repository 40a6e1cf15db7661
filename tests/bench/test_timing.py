"""The timing engine, driven by a fake clock: no real timing here."""

from __future__ import annotations

import pytest

from normbench.bench.timing import CallFailed, CpuTimer, Measurement, Rotation, TimingSpec, measure, measure_interleaved


class FakeClock:
    """A clock that only moves when a fake call says how long it took."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scripted(clock: FakeClock, durations: list[float]):
    """A callable whose i-th call takes durations[i] seconds (the last one repeats)."""
    calls = []

    def fn() -> None:
        d = durations[min(len(calls), len(durations) - 1)]
        calls.append(d)
        clock.now += d

    return fn, calls


def test_first_call_is_kept_apart_and_warmup_never_sampled():
    clock = FakeClock()
    # first call 5 s (a compile), two more warm-up calls at 1 s, then 10 ms calls
    fn, calls = scripted(clock, [5.0, 1.0, 1.0] + [0.01] * 500)
    spec = TimingSpec(warmup_calls=3, min_repeats=4, max_repeats=50, min_time_s=0.05, max_time_s=1.0, min_block_s=0,
                      floor_repeats=2)
    m = measure(fn, spec, CpuTimer(clock))
    assert m.first_call_s == pytest.approx(5.0)
    assert all(t == pytest.approx(0.01) for t in m.times)
    assert m.number == 1
    assert m.repeats == 5  # 4 samples reach min_repeats but only 0.04 s < min_time_s; the 5th gets 0.05
    assert len(calls) == 3 + 5


def test_short_calls_are_batched_into_blocks():
    clock = FakeClock()
    fn, calls = scripted(clock, [1e-4])
    spec = TimingSpec(warmup_calls=2, min_repeats=3, max_repeats=3, min_time_s=0, max_time_s=1, min_block_s=1e-3,
                      floor_repeats=3)
    m = measure(fn, spec, CpuTimer(clock))
    assert m.number == 10  # ceil(1e-3 / 1e-4)
    assert m.repeats == 3
    assert len(calls) == 2 + 3 * 10
    assert m.median == pytest.approx(1e-4)


def test_max_repeats_caps_a_fast_cell():
    clock = FakeClock()
    fn, _ = scripted(clock, [1e-3])
    spec = TimingSpec(warmup_calls=1, min_repeats=5, max_repeats=8, min_time_s=10.0, max_time_s=20.0, min_block_s=0)
    assert measure(fn, spec, CpuTimer(clock)).repeats == 8


def test_max_time_stops_a_slow_cell_at_the_floor():
    clock = FakeClock()
    fn, _ = scripted(clock, [1.0])
    spec = TimingSpec(warmup_calls=1, min_repeats=20, max_repeats=100, min_time_s=0.1, max_time_s=2.0,
                      floor_repeats=5, min_block_s=0)
    m = measure(fn, spec, CpuTimer(clock))
    assert m.repeats == 5  # 2 s of budget passed after 2 samples, but 5 is the floor


def test_median_and_iqr_of_known_samples():
    m = Measurement(times=(5.0, 1.0, 3.0, 2.0, 4.0), number=1, first_call_s=0.0)
    assert m.median == 3.0
    assert m.iqr == pytest.approx(2.0)  # inclusive quartiles 2 and 4
    assert m.mean == 3.0
    assert Measurement((7.0,), 1, 0.0).iqr == 0.0


def test_an_outlier_moves_the_median_not_much():
    clock = FakeClock()
    fn, _ = scripted(clock, [0.01, 0.01] + [0.01, 0.5, 0.01, 0.01, 0.011, 0.01, 0.009] * 3)
    spec = TimingSpec(warmup_calls=2, min_repeats=7, max_repeats=7, min_time_s=0, max_time_s=10, min_block_s=0)
    m = measure(fn, spec, CpuTimer(clock))
    assert m.median == pytest.approx(0.01)
    assert m.mean > 0.07  # the mean would have been fooled


@pytest.mark.parametrize("kwargs", [
    dict(warmup_calls=0),
    dict(min_repeats=0, floor_repeats=0),
    dict(min_repeats=10, max_repeats=5),
    dict(floor_repeats=20, min_repeats=10),
    dict(min_time_s=3.0, max_time_s=1.0),
])
def test_bad_timing_specs_are_refused(kwargs):
    with pytest.raises(ValueError):
        TimingSpec(**kwargs)


def test_interleaved_rounds_alternate_and_share_the_budget():
    clock = FakeClock()
    order = []

    def make(name, cost):
        def fn():
            order.append(name)
            clock.now += cost
        return fn

    spec = TimingSpec(warmup_calls=2, min_repeats=4, max_repeats=50, min_time_s=0.05, max_time_s=1.0, min_block_s=0,
                      floor_repeats=2)
    a, b = measure_interleaved([make("a", 0.001), make("b", 0.004)], spec, CpuTimer(clock))
    assert order[:4] == ["a", "a", "b", "b"]  # each warmed up (first call apart, then warm-up)
    rounds = order[4:]
    assert rounds == ["a", "b", "b", "a"] * (len(rounds) // 4) + ["a", "b"] * (len(rounds) % 4 // 2)
    assert a.repeats == b.repeats == len(rounds) // 2
    # stops once the rounds hold 2 x min_time_s of both together: 20 rounds of 5 ms
    assert a.repeats == 20
    assert b.median / a.median == pytest.approx(4.0)


def test_interleaving_keeps_a_ratio_through_a_drift_that_breaks_sequential_timing():
    """Calls slow down as the machine's load rises with time; the same two callables timed in the
    same rounds keep their 2x ratio within 3%, timed one after the other they do not."""
    clock = FakeClock()
    start = clock.now

    def make(cost):
        def fn():
            clock.now += cost * (1 + 10.0 * (clock.now - start))
        return fn

    spec = TimingSpec(warmup_calls=1, min_repeats=20, max_repeats=20, min_time_s=0, min_block_s=0, floor_repeats=1)
    fast, slow = make(0.002), make(0.004)
    a, b = measure_interleaved([fast, slow], spec, CpuTimer(clock))
    assert b.median / a.median == pytest.approx(2.0, rel=0.03)
    clock.now = start
    a, b = measure(fast, spec, CpuTimer(clock)), measure(slow, spec, CpuTimer(clock))
    assert b.median / a.median > 2.5


def test_a_failing_callable_is_named_by_its_index():
    def boom():
        raise ZeroDivisionError("x")

    with pytest.raises(CallFailed) as info:
        measure_interleaved([lambda: None, boom], TimingSpec(warmup_calls=1, min_repeats=1, floor_repeats=1))
    assert info.value.index == 1 and isinstance(info.value.error, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):  # one callable: its own exception
        measure(boom)


def test_rotation_calls_each_copy_in_turn_and_evicts_before_every_sample():
    clock = FakeClock()
    calls, events = [], []

    def copy(i):
        def fn():
            calls.append(i)
            events.append("call")
            clock.now += 1e-4
        return fn

    rot = Rotation([copy(i) for i in range(3)], evict=lambda: events.append("evict"))
    spec = TimingSpec(warmup_calls=1, min_repeats=4, max_repeats=4, min_time_s=0, min_block_s=1e-3, floor_repeats=1)
    m = measure(rot, spec, CpuTimer(clock))
    assert m.number == 3  # 10 calls would fill 1 ms; capped at one call per copy since the eviction
    assert calls == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert events[1:] == ["evict", "call", "call", "call"] * 4  # each sample right after an eviction


@pytest.mark.parametrize("evict_s, expected", [(0.1, 15), (1.0, 10), (0.0, 200)])
def test_untimed_evictions_count_against_the_time_limit_after_min_repeats(evict_s, expected):
    # a tiny pass (0.1 ms a call) timed cold: without a budget for the evictions it would take all
    # 200 samples (its measured time never reaches min_time_s), 200 evictions of evict_s each
    clock = FakeClock()

    def fn():
        clock.now += 1e-4

    def evict():
        clock.now += evict_s

    spec = TimingSpec(warmup_calls=1, min_repeats=10, max_repeats=200, min_time_s=0.2, max_time_s=1.5,
                      min_block_s=1e-3, floor_repeats=5)
    m = measure(Rotation([fn, fn], evict=evict), spec, CpuTimer(clock))
    assert m.repeats == expected  # 0.1 s: 15 samples of 0.1002 s pass 1.5 s; 1 s: min_repeats still taken


def test_warm_rotation_primes_its_inputs_before_every_sample():
    clock = FakeClock()
    calls = []

    def fn():
        calls.append(clock.now)
        clock.now += 0.01

    spec = TimingSpec(warmup_calls=1, min_repeats=3, max_repeats=3, min_time_s=0, min_block_s=0, floor_repeats=1)
    m = measure(Rotation([fn], prime=True), spec, CpuTimer(clock))
    assert m.repeats == 3 and len(calls) == 1 + 2 * 3  # an untimed call before each timed one
    assert m.times == pytest.approx((0.01,) * 3)


class OtherRank:
    """A :class:`~normbench.bench.timing.Consensus` as one rank sees it under torchrun: the other
    rank chose ``their_number`` calls per sample, and rank 0 stops after round ``stop_after``."""

    def __init__(self, their_number: int, stop_after: int) -> None:
        self.their_number, self.stop_after = their_number, stop_after
        self.rounds = 0
        self.asked: list[bool] = []

    def numbers(self, numbers: list[int]) -> list[int]:
        return [min(n, self.their_number) for n in numbers]

    def stop(self, stop: bool) -> bool:
        self.asked.append(stop)
        self.rounds += 1
        return self.rounds >= self.stop_after


def test_ranks_make_the_calls_they_agree_on_not_their_own():
    # alone: 1e-4 s calls batch 10 per sample and stop after min_repeats (4) rounds
    spec = TimingSpec(warmup_calls=1, min_repeats=4, max_repeats=50, min_time_s=0, max_time_s=1, min_block_s=1e-3,
                      floor_repeats=2)
    clock = FakeClock()
    fn, calls = scripted(clock, [1e-4])
    alone = measure(fn, spec, CpuTimer(clock))
    assert (alone.number, alone.repeats, len(calls)) == (10, 4, 1 + 40)

    clock = FakeClock()
    fn, calls = scripted(clock, [1e-4])
    other = OtherRank(their_number=3, stop_after=9)  # rank 0 wants fewer calls per sample, more rounds
    agreed = measure(fn, spec, CpuTimer(clock), other)
    assert (agreed.number, agreed.repeats, len(calls)) == (3, 9, 1 + 27)
    assert other.asked[:3] == [False, False, False] and other.asked[3] is True  # its own rule, overruled

    clock = FakeClock()
    fn, calls = scripted(clock, [1e-4])
    early = measure(fn, spec, CpuTimer(clock), OtherRank(their_number=50, stop_after=2))
    assert (early.number, early.repeats, len(calls)) == (10, 2, 1 + 20)
