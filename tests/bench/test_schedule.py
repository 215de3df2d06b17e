"""The open-loop schedule and the open-loop caller, on a fake clock."""

from __future__ import annotations

import itertools

import pytest

from rpcframe.bench.engine import _sync_closed_loop, _sync_open_loop
from rpcframe.bench.histogram import Recorder
from rpcframe.bench.schedule import OpenLoopSchedule


class FakeClock:
    """A clock that only moves when told to (by sleep() or by a fake call)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_send_times_follow_the_rate() -> None:
    schedule = OpenLoopSchedule(rps=4, start=10.0, duration=1.0)
    assert [schedule.send_time(i) for i in range(5)] == [10.0, 10.25, 10.5, 10.75, 11.0]
    assert schedule.count() == 4  # sends strictly before start + duration


@pytest.mark.parametrize(
    ("rps", "duration", "total", "expected"),
    [(4, 1.0, None, 4), (4, 1.0, 3, 3), (1000, 0.25, None, 250), (3, 1.0, None, 3), (2.5, 2.0, None, 5),
     (10, None, 7, 7), (10, None, None, None), (1000, 10.0, None, 10_000)],
)  # fmt: skip
def test_count(rps: float, duration: float | None, total: int | None, expected: int | None) -> None:
    assert OpenLoopSchedule(rps, 0.0, duration, total).count() == expected


def test_due_on_a_fake_clock() -> None:
    clock = FakeClock(99.0)
    schedule = OpenLoopSchedule(rps=10, start=100.0, duration=1.0)
    assert schedule.due(clock()) == 0
    clock.now = 100.0
    assert schedule.due(clock()) == 1
    clock.now = 100.35
    assert schedule.due(clock()) == 4  # sends at .0 .1 .2 .3
    clock.now = 105.0
    assert schedule.due(clock()) == 10  # capped at the schedule's count
    assert schedule.lag(3, 100.35) == pytest.approx(0.05)


def test_no_drift_over_a_long_schedule() -> None:
    schedule = OpenLoopSchedule(rps=3, start=0.0)
    assert schedule.send_time(3_000_000) == pytest.approx(1_000_000.0, abs=1e-6)


def test_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="rps"):
        OpenLoopSchedule(rps=0, start=0.0)


def test_open_loop_charges_a_stall_to_the_calls_queued_behind_it() -> None:
    """One 1 s stall at 10 rps: the 9 calls due during it wait, and that wait is latency."""
    clock = FakeClock(0.0)
    service_times = iter([1.0] + [0.01] * 19)

    def call() -> int:
        clock.now += next(service_times)
        return 1

    rec = Recorder(t0=0.0)
    schedule = OpenLoopSchedule(rps=10, start=0.0, duration=2.0)
    _sync_open_loop(call, rec, 2.0, itertools.count(), schedule, clock, clock.sleep)
    assert rec.ok == 20
    # Call 1 was due at 0.1 but started at 1.0 and ended at 1.01: 910 ms.
    # Call 9 was due at 0.9, started at 1.08, ended 1.09: 190 ms.
    assert rec.hist.get_max_value() == pytest.approx(1_000_000, rel=1e-3)
    assert rec.hist.get_value_at_percentile(50) >= 10_000
    # Calls 1..10 (due 0.1..1.0) start behind schedule; call 11, due at 1.1, is on time again.
    assert rec.late == 10
    latencies_ms = sorted(round(v.value_iterated_to / 1000) for v in rec.hist.get_recorded_iterator())
    assert 910 in latencies_ms
    assert 190 in latencies_ms
    # After catching up, the caller sleeps until each due time instead of sending early.
    assert clock.sleeps
    assert clock.now == pytest.approx(1.91, abs=1e-9)


def test_closed_loop_measures_from_the_actual_send() -> None:
    """The same stall in a closed loop is one slow call: the queue behind it is invisible."""
    clock = FakeClock(0.0)
    service_times = iter([1.0] + [0.01] * 9)

    def call() -> int:
        clock.now += next(service_times)
        return 1

    rec = Recorder(t0=0.0)
    _sync_closed_loop(call, rec, 100.0, itertools.count(), 10, clock)
    assert rec.ok == 10
    assert rec.hist.get_value_at_percentile(90) == pytest.approx(10_000, rel=1e-3)
