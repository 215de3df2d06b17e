"""HDR percentile math, per-caller recorders, and merging across processes."""

from __future__ import annotations

import grpc
import pytest

import rpcframe
from rpcframe.bench.histogram import (
    HIGHEST_US,
    Partial,
    Recorder,
    decode,
    merge,
    new_histogram,
    percentiles,
    status_name,
)


def test_percentiles_of_known_data() -> None:
    hist = new_histogram()
    for us in range(1, 1001):  # 1..1000 µs, once each
        hist.record_value(us)
    stats = percentiles(hist)
    # Below 2048 a 3-digit HDR histogram is exact.
    assert stats == {"count": 1000, "min": 1, "mean": 500.5, "p50": 500, "p90": 900, "p99": 990,
                     "p99.9": 999, "max": 1000}  # fmt: skip


def test_percentiles_keep_three_significant_digits_for_large_values() -> None:
    hist = new_histogram()
    for _ in range(99):
        hist.record_value(1_000)
    hist.record_value(2_500_000)  # one 2.5 s outlier
    stats = percentiles(hist)
    assert stats["p50"] == 1_000
    assert stats["p99"] == 1_000
    assert stats["max"] == pytest.approx(2_500_000, rel=1e-3)


def test_empty_histogram_reports_zeros() -> None:
    stats = percentiles(new_histogram())
    assert stats["count"] == 0
    assert stats["p99"] == 0


def test_recorder_counts_latency_seconds_and_statuses() -> None:
    rec = Recorder(t0=100.0)
    rec.success(100.0, 100.0005, 1)  # 500 µs, second 0
    rec.success(100.2, 100.4, 3)  # 200 ms, second 0
    rec.success(101.0, 101.5, 1)  # 500 ms, second 1
    rec.failure(101.6, rpcframe.Unavailable("down"))
    rec.failure(102.1, ValueError("bad"))
    assert (rec.ok, rec.failed, rec.messages, rec.calls) == (3, 2, 5, 5)
    assert rec.status == {"UNAVAILABLE": 1, "CLIENT_ValueError": 1}
    assert rec.error_samples["UNAVAILABLE"] == "down"
    assert sorted(rec.buckets) == [0, 1, 2]
    assert (rec.buckets[0].ok, rec.buckets[0].messages) == (2, 4)
    assert (rec.buckets[1].ok, rec.buckets[1].failed) == (1, 1)
    assert rec.hist.get_total_count() == 3


def test_latency_is_clamped_to_the_histogram_range() -> None:
    rec = Recorder(t0=0.0)
    rec.success(5.0, 5.0, 1)  # zero -> 1 µs
    rec.success(0.0, 2 * HIGHEST_US / 1e6, 1)  # beyond one hour -> one hour
    assert rec.hist.get_min_value() == 1
    assert rec.hist.get_max_value() == pytest.approx(HIGHEST_US, rel=1e-3)


def test_partials_merge_like_one_recorder() -> None:
    one, two, both = Recorder(0.0), Recorder(0.0), Recorder(0.0)
    for i in range(1, 501):
        one.success(0.0, i / 1e6, 1)
        both.success(0.0, i / 1e6, 1)
    for i in range(501, 1001):
        two.success(1.0, 1.0 + i / 1e6, 2)
        both.success(1.0, 1.0 + i / 1e6, 2)
    two.failure(1.5, rpcframe.DeadlineExceeded("slow"))
    # Two processes, each one recorder, through the picklable form.
    merged = merge([Partial.from_recorders([one], 1.0, (0.1, 0.05)),
                    Partial.from_recorders([two], 2.0, (0.2, 0.05))])  # fmt: skip
    assert (merged.ok, merged.failed, merged.messages) == (1000, 1, 1500)
    assert merged.status == {"DEADLINE_EXCEEDED": 1}
    assert percentiles(merged.histogram) == percentiles(both.hist)
    assert merged.elapsed == 2.0
    assert merged.cpu_user == pytest.approx(0.3)
    assert [s.second for s in merged.timeline] == [0, 1]
    assert [(s.ok, s.failed, s.messages) for s in merged.timeline] == [(500, 0, 500), (500, 1, 1000)]
    assert merged.timeline[1].p99_us == pytest.approx(995, rel=0.01)


def test_histogram_encoding_round_trips() -> None:
    hist = new_histogram()
    for us in (10, 20, 30, 1_000_000):
        hist.record_value(us)
    assert percentiles(decode(hist.encode())) == percentiles(hist)


def test_status_name_of_grpc_and_other_errors() -> None:
    class Fake(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

    assert status_name(Fake()) == "RESOURCE_EXHAUSTED"
    assert status_name(rpcframe.NotFound("x")) == "NOT_FOUND"
    assert status_name(RuntimeError()) == "CLIENT_RuntimeError"
