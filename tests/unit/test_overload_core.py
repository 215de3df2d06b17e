"""The admission core on a fake clock: the limiter converges and reacts, criticality orders shedding."""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest

from rpcframe._core.overload import (
    Admission,
    GradientLimiter,
    LatencyMedian,
    OverloadConfig,
    TokenBucket,
    criticality_share,
)  # fmt: skip
from rpcframe.errors import ConfigError


def _simulate(admission: Admission, rate: float, seconds: float, work: float, start: float = 0.0,
              critical_share: float = 0.0) -> dict[str, list[float]]:  # fmt: skip
    """A processor-sharing server (a CPU-bound Python server: running calls share one core).

    Poisson arrivals at ``rate``/s, each needing ``work`` seconds of CPU, stepped every 0.1 ms.
    A ``critical_share`` of the calls are CRITICAL, the rest SHEDDABLE.
    Returns the latencies of admitted calls and the arrival times of refused ones, per class.
    """
    rng = random.Random(7)
    step, now, end = 0.0001, start, start + seconds
    running: list[list[float]] = []  # [work left, admitted at, share]
    out: dict[str, list[float]] = {"ok": [], "refused": [], "critical_ok": [], "critical_refused": []}
    next_arrival = now + rng.expovariate(rate)
    while now < end:
        while next_arrival <= now:
            critical = rng.random() < critical_share
            criticality = "CRITICAL" if critical else "SHEDDABLE" if critical_share else None
            share = criticality_share(criticality)
            if admission.begin(now, criticality) is None:
                running.append([work, now, share])
            else:
                out["critical_refused" if critical else "refused"].append(now)
            next_arrival += rng.expovariate(rate)
        now += step
        if running:
            slice_ = step / len(running)
            for call in running:
                call[0] -= slice_
            for call in [c for c in running if c[0] <= 0]:
                admission.end(call[1], now)
                running.remove(call)
                out["critical_ok" if call[2] == 1.0 and critical_share else "ok"].append(now - call[1])
    for call in running:  # the next phase starts with an empty server
        admission.end(call[1], now)
    return out


def _p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)]


def test_the_limit_converges_under_5x_overload_and_keeps_latency_near_the_unloaded() -> None:
    admission = Admission(OverloadConfig(), now=0.0, share=criticality_share)
    unloaded = _simulate(admission, rate=250, seconds=2, work=0.002)  # half of capacity (500/s)
    overloaded = _simulate(admission, rate=2500, seconds=4, work=0.002, start=2.0)
    assert admission.limiter.limit < 8  # from 1000, adapted to a one-core server
    assert _p99(overloaded["ok"]) <= 2 * _p99(unloaded["ok"])  # from the first second of overload
    assert len(overloaded["ok"]) / 4 >= 0.9 * 500  # goodput near capacity: refusals are free here
    assert overloaded["refused"]  # the rest was refused at once


def test_the_limit_grows_back_when_calls_get_cheaper() -> None:
    admission = Admission(OverloadConfig(), now=0.0, share=criticality_share)
    _simulate(admission, rate=250, seconds=1, work=0.002)
    _simulate(admission, rate=2500, seconds=2, work=0.002, start=1.0)
    tight = admission.limiter.limit
    assert tight < 8
    _simulate(admission, rate=2500, seconds=3, work=0.0002, start=3.0)  # 10x cheaper calls, same load
    assert admission.limiter.limit >= tight
    assert admission.limiter.min_rtt < 0.001  # re-measured from calls that ran alone


def test_an_idle_server_does_not_inflate_its_limit() -> None:
    admission = Admission(OverloadConfig(), now=0.0, share=criticality_share)
    _simulate(admission, rate=50, seconds=3, work=0.002)  # rarely more than one call at once
    assert admission.limiter.limit <= OverloadConfig().initial_limit


def test_a_burst_after_an_idle_gap_is_not_taken_for_a_stall() -> None:
    admission = Admission(OverloadConfig(), now=0.0, share=criticality_share)
    _simulate(admission, rate=2000, seconds=1, work=0.0002)  # light load: the limit stays high
    before = admission.limiter.limit
    now = 1.5  # idle for half a second, then two calls at once
    for _ in range(2):
        assert admission.begin(now) is None
        now += 0.0001
    assert admission.limiter.limit >= min(before, 16)  # the gap was no stall: no crash of the limit
    # A real stall (calls running, none completing for over an interval) still lowers it.
    assert admission.begin(now + 0.5) is None
    assert admission.limiter.limit < 8


def test_latency_within_noise_of_the_target_does_not_collapse_the_limit() -> None:
    # A fast method's calls ran alone (no-load latency 0.04 ms, target 5.04 ms); a 5 ms method's
    # median is just above the target. That is no queueing: the limit must not fall to the peak.
    config = OverloadConfig()
    limiter = GradientLimiter(config, now=0.0)
    now = 0.0
    for _ in range(4):
        now += 0.001
        limiter.sample(0.00004, True, now)
    for _ in range(20):
        now += 0.006
        limiter.peak = max(limiter.peak, 2)
        limiter.sample(0.00515, False, now)
    assert limiter.min_rtt == pytest.approx(0.00004)
    assert limiter.limit >= config.initial_limit * 0.9
    # Clear queueing (latency at twice the target) still shrinks it to the concurrency seen.
    for _ in range(20):
        now += 0.006
        limiter.peak = max(limiter.peak, 2)
        limiter.sample(0.0101, False, now)
    assert limiter.limit < 4


def test_a_server_busy_without_calls_alone_pins_its_limit_to_remeasure() -> None:
    config = OverloadConfig(min_rtt_interval=1.0, min_rtt_samples=3, initial_limit=4)
    limiter = GradientLimiter(config, now=0.0)
    limiter.sample(0.002, True, 0.0)  # one call alone: min_rtt known
    now = 0.0
    while now < 1.2:  # busy: every call runs with others
        now += 0.01
        limiter.sample(0.004, False, now)
    assert limiter.limit == config.min_limit
    for _ in range(3):
        now += 0.003
        limiter.sample(0.0025, True, now)
    assert limiter.limit > config.min_limit  # restored after the measurement
    assert limiter.min_rtt == pytest.approx(0.0025, abs=0.0006)


def test_mixed_criticality_sheds_the_sheddable_first() -> None:
    admission = Admission(OverloadConfig(), now=0.0, share=criticality_share)
    _simulate(admission, rate=250, seconds=1, work=0.002)  # started unloaded
    out = _simulate(admission, rate=1500, seconds=4, work=0.002, start=1.0, critical_share=0.2)  # 3x; critical 0.6x
    critical = len(out["critical_ok"]) / (len(out["critical_ok"]) + len(out["critical_refused"]))
    sheddable = len(out["ok"]) / (len(out["ok"]) + len(out["refused"]))
    # Poisson arrivals on a processor-sharing server: a class at 0.6x load alone
    # would exceed a concurrency of 6 about 5 % of the time; yielding keeps its losses near 1 %.
    assert critical >= 0.98
    assert 0 < sheddable < 0.2  # what is left over, not nothing


def test_queue_delay_refuses_by_criticality() -> None:
    admission = Admission(OverloadConfig(queue_target=0.01), now=0.0, share=criticality_share)

    def admit(criticality: str, delay: float) -> object:
        admission.queue_delay = delay
        return admission.begin(0.0, criticality)

    assert admit("SHEDDABLE", 0.006) == ("queue", 0.006)
    assert admit("CRITICAL_PLUS", 0.011) is None
    assert admit("CRITICAL", 0.011) is not None
    assert admit("SHEDDABLE_PLUS", 0.001) == ("priority", 0.001)  # yields after a CRITICAL was refused


def test_a_call_that_cannot_meet_its_deadline_is_refused() -> None:
    def remaining(carrier: float | None) -> float | None:  # the carrier is the call's seconds left
        return carrier

    admission = Admission(OverloadConfig(), now=0.0, remaining=remaining)
    for i in range(LatencyMedian.SIZE):
        assert admission.begin(i * 0.03) is None
        admission.end(i * 0.03, i * 0.03 + 0.02)
    assert admission.latency.median == pytest.approx(0.02)
    assert admission.begin(2.0, 0.01) == ("deadline", 0.0)
    assert admission.begin(2.0, 0.05) is None
    assert admission.begin(2.0, None) is None  # no deadline
    unshed = Admission(OverloadConfig(deadline_shedding=False), 0.0, remaining=remaining)
    for i in range(LatencyMedian.SIZE):
        assert unshed.begin(i * 0.03) is None
        unshed.end(i * 0.03, i * 0.03 + 0.02)
    assert unshed.begin(2.0, 0.0) is None


def test_a_call_s_deadline_is_read_only_while_the_median_is_a_millisecond_or_more() -> None:
    """The median is kept per batch of 64 calls; below 1 ms a call is not worth refusing for its deadline."""
    reads: list[object] = []

    def remaining(carrier: float | None) -> float | None:
        reads.append(carrier)
        return carrier

    admission = Admission(OverloadConfig(), now=0.0, remaining=remaining)

    def batch(start: float, latency: float) -> None:
        for i in range(LatencyMedian.SIZE):
            assert admission.begin(start + i * 0.03, 1.0) is None
            admission.end(start + i * 0.03, start + i * 0.03 + latency)

    batch(0.0, 0.0001)  # fast: no median yet, then 0.1 ms
    assert reads == []
    batch(10.0, 0.02)  # the first of these still ran under the 0.1 ms median
    assert admission.latency.median == pytest.approx(0.02)
    assert reads == []
    assert admission.begin(20.0, 0.01) == ("deadline", 0.0)  # now read: 10 ms left < 20 ms
    batch(30.0, 0.0001)  # read while the median stays 20 ms, then the batch ends at 0.1 ms
    assert len(reads) == 1 + LatencyMedian.SIZE
    assert admission.begin(40.0, 0.00001) is None  # fast again: not read, not refused
    assert len(reads) == 1 + LatencyMedian.SIZE


def test_a_queued_call_s_wait_is_the_median_shared_among_the_workers() -> None:
    waiting = [0]
    admission = Admission(OverloadConfig(queue_target=0.05), now=0.0, queued=lambda: waiting[0], workers=4)
    for i in range(LatencyMedian.SIZE):  # median 20 ms
        assert admission.begin(i * 0.03) is None
        admission.end(i * 0.03, i * 0.03 + 0.02)
    waiting[0] = 9  # 9 x 20 ms / 4 = 45 ms: under the 50 ms target
    assert admission.begin(5.0) is None
    admission.end(5.0, 5.001)
    waiting[0] = 11  # 55 ms
    rejected = admission.begin(6.0)
    assert rejected is not None
    assert rejected.reason == "queue"


def test_unknown_criticality_counts_as_critical() -> None:
    assert criticality_share(None) == criticality_share("bogus") == criticality_share("critical") == 1.0
    assert criticality_share("SHEDDABLE") < criticality_share("SHEDDABLE_PLUS") < 1.0 < criticality_share(
        "CRITICAL_PLUS"
    )


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.1)  # empty: the next token in 1/rate s
    assert bucket.take(0.05) == pytest.approx(0.05)
    assert bucket.take(0.1) == 0.0


@pytest.mark.parametrize(
    "kwargs", [{"min_limit": 0}, {"initial_limit": 2000}, {"queue_target": 0}, {"min_rtt_samples": 0}]
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        OverloadConfig(**kwargs)  # type: ignore[arg-type]


def test_handler_threads_keep_an_exact_running_count_without_a_lock() -> None:
    """begin and end from many threads at once, switching as often as the interpreter can: no call is lost."""
    admission = Admission(OverloadConfig(), now=time.monotonic())
    peaks: list[int] = []

    def handler_thread() -> None:
        peak = 0
        for _ in range(5_000):
            started = time.monotonic()
            assert admission.begin(started) is None
            peak = max(peak, admission.running)
            admission.end(started, time.monotonic())
        peaks.append(peak)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=handler_thread) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert len(peaks) == 8  # every thread finished without an error
    assert max(peaks) > 1  # the calls did overlap ...
    assert admission.running == 0  # ... and each end undid exactly its begin
    assert admission.latency.median > 0
