"""Latency recording: HDR histograms in microseconds, one recorder per caller.

Each caller (thread or coroutine) owns a :class:`Recorder`, so the hot path
takes no lock. A recorder keeps a whole-run histogram (3 significant digits)
and one small histogram per second of the run (2 digits, for the p99-over-
time plot). At the end the recorders of a process become one picklable
:class:`Partial` (histograms HDR-encoded), and the partials of every
load-generator process are merged with :func:`merge`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = [
    "HIGHEST_US",
    "PERCENTILES",
    "Merged",
    "Partial",
    "Recorder",
    "decode",
    "merge",
    "new_histogram",
    "percentile_curve",
    "percentiles",
    "status_name",
]

LOWEST_US = 1
#: Longest latency recorded (one hour); longer ones are clamped to it.
HIGHEST_US = 3_600_000_000
#: Percentiles every report shows.
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
_BUCKET_DIGITS = 2  # per-second histograms: 27 KB each instead of 188 KB
_KEEP_ERROR_SAMPLES = 10


def new_histogram(digits: int = 3) -> Any:
    """An empty HDR histogram for 1 µs .. 1 h with ``digits`` significant digits."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def decode(encoded: bytes) -> Any:
    """A histogram from :meth:`HdrHistogram.encode` output."""
    return HdrHistogram.decode(encoded)


def percentiles(histogram: Any) -> dict[str, float]:
    """count, min, mean, p50, p90, p99, p99.9 and max of a histogram, in µs."""
    count = int(histogram.get_total_count())
    out: dict[str, float] = {"count": count}
    if count == 0:
        out.update({"min": 0, "mean": 0.0, "max": 0})
        out.update({_label(p): 0 for p in PERCENTILES})
        return out
    out["min"] = int(histogram.get_min_value())
    out["mean"] = round(float(histogram.get_mean_value()), 1)
    for p in PERCENTILES:
        out[_label(p)] = int(histogram.get_value_at_percentile(p))
    out["max"] = int(histogram.get_max_value())
    return out


def _label(p: float) -> str:
    return f"p{p:g}"


def percentile_curve(histogram: Any, ticks_per_half: int = 5) -> list[tuple[float, int]]:
    """(percentile, µs) points of the latency-by-percentile curve."""
    if histogram.get_total_count() == 0:
        return []
    return [
        (float(item.percentile_level_iterated_to), int(item.value_iterated_to))
        for item in histogram.get_percentile_iterator(ticks_per_half)
    ]


def status_name(exc: BaseException) -> str:
    """The gRPC status name of a failed call, or the exception type for others."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            value = code()
        except Exception:  # noqa: BLE001 - a broken exception still gets counted
            value = None
        name = getattr(value, "name", None)
        if isinstance(name, str):
            return name
    return f"CLIENT_{type(exc).__name__}"


def _details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        try:
            text = details()
        except Exception:  # noqa: BLE001
            text = None
        if isinstance(text, str) and text:
            return text
    return str(exc) or type(exc).__name__


class _Bucket:
    """One second of one recorder."""

    __slots__ = ("failed", "hist", "messages", "ok")

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.messages = 0
        self.hist = new_histogram(_BUCKET_DIGITS)


class Recorder:
    """Counts and latencies of one caller. Not thread-safe: one per caller.

    Args:
        t0: start of the phase on the ``time.perf_counter`` clock; seconds
            of the timeline count from it.
    """

    __slots__ = ("_bucket", "_second", "buckets", "error_samples", "failed", "hist", "late", "messages", "ok",
                 "status", "t0")  # fmt: skip

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.hist = new_histogram()
        self.ok = 0
        self.failed = 0
        self.messages = 0
        #: open loop: sends that started more than 1 ms after their intended time
        self.late = 0
        #: failed calls by status name
        self.status: dict[str, int] = {}
        #: the first details seen per failing status name
        self.error_samples: dict[str, str] = {}
        self.buckets: dict[int, _Bucket] = {}
        self._second = -1
        self._bucket = _Bucket()

    def success(self, start: float, end: float, messages: int) -> None:
        """A call sent (or due) at ``start`` finished OK at ``end``."""
        us = int((end - start) * 1_000_000)
        if us < LOWEST_US:
            us = LOWEST_US
        elif us > HIGHEST_US:
            us = HIGHEST_US
        self.hist.record_value(us)
        bucket = self._bucket if int(end - self.t0) == self._second else self._bucket_at(end)
        bucket.hist.record_value(us)
        bucket.ok += 1
        bucket.messages += messages
        self.ok += 1
        self.messages += messages

    def failure(self, end: float, exc: BaseException) -> None:
        """A call failed at ``end`` with ``exc`` (its latency is not recorded)."""
        name = status_name(exc)
        self.status[name] = self.status.get(name, 0) + 1
        if name not in self.error_samples and len(self.error_samples) < _KEEP_ERROR_SAMPLES:
            self.error_samples[name] = _details(exc)
        bucket = self._bucket if int(end - self.t0) == self._second else self._bucket_at(end)
        bucket.failed += 1
        self.failed += 1

    def _bucket_at(self, end: float) -> _Bucket:
        second = max(0, int(end - self.t0))
        bucket = self.buckets.get(second)
        if bucket is None:
            bucket = self.buckets[second] = _Bucket()
        self._second, self._bucket = second, bucket
        return bucket

    @property
    def calls(self) -> int:
        """Calls finished so far (read from other threads for progress)."""
        return self.ok + self.failed


@dataclass(slots=True)
class Partial:
    """What one load-generator process measured (picklable, histograms encoded)."""

    ok: int = 0
    failed: int = 0
    messages: int = 0
    late: int = 0
    status: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)
    histogram: bytes = b""
    #: second -> (ok, failed, messages, encoded histogram)
    buckets: dict[int, tuple[int, int, int, bytes]] = field(default_factory=dict)
    elapsed: float = 0.0
    cpu_user: float = 0.0
    cpu_system: float = 0.0

    @classmethod
    def from_recorders(cls, recorders: list[Recorder], elapsed: float, cpu: tuple[float, float]) -> Partial:
        """Combine the recorders of one process."""
        hist = new_histogram()
        buckets: dict[int, list[Any]] = {}
        part = cls(elapsed=elapsed, cpu_user=cpu[0], cpu_system=cpu[1])
        for rec in recorders:
            hist.add(rec.hist)
            part.ok += rec.ok
            part.failed += rec.failed
            part.messages += rec.messages
            part.late += rec.late
            for name, n in rec.status.items():
                part.status[name] = part.status.get(name, 0) + n
            for name, text in rec.error_samples.items():
                part.error_samples.setdefault(name, text)
            for second, b in rec.buckets.items():
                acc = buckets.get(second)
                if acc is None:
                    acc = buckets[second] = [0, 0, 0, new_histogram(_BUCKET_DIGITS)]
                acc[0] += b.ok
                acc[1] += b.failed
                acc[2] += b.messages
                acc[3].add(b.hist)
        part.histogram = hist.encode()
        part.buckets = {s: (a[0], a[1], a[2], a[3].encode()) for s, a in sorted(buckets.items())}
        return part


@dataclass(slots=True)
class Second:
    """One second of the merged timeline."""

    second: int
    ok: int
    failed: int
    messages: int
    p50_us: int
    p99_us: int
    #: seconds the bucket covers: 1, except for the last, partial one
    width: float = 1.0


@dataclass(slots=True)
class Merged:
    """Partials of every process combined."""

    ok: int
    failed: int
    messages: int
    late: int
    status: dict[str, int]
    error_samples: dict[str, str]
    histogram: Any
    timeline: list[Second]
    elapsed: float
    cpu_user: float
    cpu_system: float


def merge(partials: list[Partial]) -> Merged:
    """Add up the partials of every load-generator process.

    Elapsed time is the longest process's (they start together); CPU time
    is the sum over processes.
    """
    hist = new_histogram()
    status: dict[str, int] = {}
    samples: dict[str, str] = {}
    seconds: dict[int, list[Any]] = {}
    for part in partials:
        if part.histogram:
            hist.add(decode(part.histogram))
        for name, n in part.status.items():
            status[name] = status.get(name, 0) + n
        for name, text in part.error_samples.items():
            samples.setdefault(name, text)
        for second, (ok, failed, messages, encoded) in part.buckets.items():
            acc = seconds.get(second)
            if acc is None:
                acc = seconds[second] = [0, 0, 0, new_histogram(_BUCKET_DIGITS)]
            acc[0] += ok
            acc[1] += failed
            acc[2] += messages
            acc[3].add(decode(encoded))
    elapsed = max((p.elapsed for p in partials), default=0.0)
    timeline = []
    for second in range(max(seconds) + 1 if seconds else 0):
        ok, failed, messages, bucket = seconds.get(second) or [0, 0, 0, new_histogram(_BUCKET_DIGITS)]
        empty = bucket.get_total_count() == 0
        # The last second is usually cut short by the end of the phase.
        width = min(1.0, max(elapsed - second, 0.001))
        timeline.append(Second(second, ok, failed, messages,
                               0 if empty else int(bucket.get_value_at_percentile(50)),
                               0 if empty else int(bucket.get_value_at_percentile(99)), width))  # fmt: skip
    return Merged(
        ok=sum(p.ok for p in partials),
        failed=sum(p.failed for p in partials),
        messages=sum(p.messages for p in partials),
        late=sum(p.late for p in partials),
        status=status,
        error_samples=samples,
        histogram=hist,
        timeline=timeline,
        elapsed=elapsed,
        cpu_user=sum(p.cpu_user for p in partials),
        cpu_system=sum(p.cpu_system for p in partials),
    )
