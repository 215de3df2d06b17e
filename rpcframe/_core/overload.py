"""Overload protection, decided without I/O: who gets in when a server is full.

A server that queues everything under overload makes every call late: its
CPU goes to work whose caller has given up, and goodput collapses. The
:class:`Admission` here refuses calls at once instead, before their
handler runs (so a client may send them elsewhere), from three signals:

- **An adaptive concurrency limit** (:class:`GradientLimiter`), Envoy's
  gradient form: every ``update_interval`` the limit becomes
  ``limit * target / sample_rtt + sqrt(limit)``: ``sample_rtt`` is the
  interval's median handler latency, ``target`` the no-load latency
  ``min_rtt`` plus 25 % (``buffer``) or 5 ms (``tolerance``), whichever is
  more, and ``min_rtt`` the median latency of recent calls that ran alone
  (a server busy for ``min_rtt_interval`` without one pins its limit to
  ``min_limit`` for a few calls to measure it). When calls slow down
  because too many run at once (a CPU-bound Python server shares one GIL),
  the limit falls until they do not; ``sqrt(limit)`` keeps room to grow.
  It starts high and only falls on evidence of queueing.
- **Queueing delay** (``queue_delay``), which the front measures (the event
  loop's lag on asyncio, where a CPU-bound handler never yields and so the
  concurrency never rises above one): over ``queue_target`` the server is
  behind, and calls are refused until it catches up.
- **Deadlines**: a call with less time left than its method's recent median
  latency (:class:`LatencyMedian`) cannot finish in time and is refused.

**Criticality** decides who is refused first: each class is admitted up to
its share of the limit and of the queue target (SHEDDABLE a quarter,
SHEDDABLE_PLUS half, CRITICAL all, CRITICAL_PLUS twice), and once a class
is refused the classes below it yield for half a second, so under
overload the least critical work goes first. A call carries its class in the
``rpcframe-criticality`` header (:data:`CRITICALITY_KEY`), inherited by the
calls its handler makes, like its deadline; without one it is CRITICAL
(as at Google). Health and reflection calls are never refused.

:class:`TokenBucket` holds the rate limits. Everything is pure: time comes
in as ``now`` (monotonic seconds), so the tests drive a fake clock.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import ConfigError

__all__ = [
    "CRITICALITIES", "CRITICALITY_KEY", "Admission", "GradientLimiter", "LatencyMedian", "OverloadConfig",
    "RateLimit", "RateLimiter", "Rejection", "TokenBucket", "check_criticality", "criticality_share", "criticality_var",
]  # fmt: skip

#: Metadata key carrying a call's criticality across hops.
CRITICALITY_KEY = "rpcframe-criticality"

#: Criticality classes, most critical first, and the share of the limit each may fill.
_SHARES = {"CRITICAL_PLUS": 2.0, "CRITICAL": 1.0, "SHEDDABLE_PLUS": 0.5, "SHEDDABLE": 0.25}
CRITICALITIES = tuple(_SHARES)
_LEAST = min(_SHARES.values())

#: A gradient (target / sampled latency) below this is queueing: the limit shrinks to the
#: concurrency that caused it. Between it and 1 the limit only follows the gradient.
_QUEUEING = 0.9


#: The criticality set by ``with rpcframe.criticality(...)`` for calls made in the block.
criticality_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rpcframe_criticality", default=None)


def check_criticality(value: str) -> str:
    """``value`` as a criticality name (upper case); ConfigError when it is not one."""
    name = value.upper() if isinstance(value, str) else value
    if name not in _SHARES:
        raise ConfigError(f"criticality must be one of {', '.join(CRITICALITIES)}, got {value!r}")
    return name


def criticality_share(value: str | None) -> float:
    """The share of the limit a call of criticality ``value`` may fill (unknown or None: CRITICAL's)."""
    if value is None:
        return 1.0
    return _SHARES.get(value.upper(), 1.0)


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    """Server admission control (``ServerConfig.overload``; None turns it off).

    Attributes:
        initial_limit: calls admitted at once until latency says otherwise
            (high: the limit only falls on evidence of queueing).
        min_limit: the limit never goes below this; it is also the limit
            while the no-load latency is measured (see :class:`GradientLimiter`).
        max_limit: the limit never goes above this.
        buffer: latency above the no-load latency that counts as no queueing
            (0.25: 25 %) ...
        tolerance: ... or this many seconds, when that is more: a few
            milliseconds of queueing are not worth refusing calls for (fast
            handlers' latency is mostly scheduling noise).
        update_interval: seconds between limit updates.
        min_rtt_interval: seconds between no-load latency measurements.
        min_rtt_samples: calls measured at ``min_limit`` each time.
        queue_target: seconds of queueing delay (asyncio: event-loop lag)
            above which CRITICAL calls are refused (SHEDDABLE_PLUS at half of
            it, SHEDDABLE at a quarter, CRITICAL_PLUS at twice). 50 ms: a
            loop that lags less is slow, not overloaded (and a machine
            shared with other processes lags that much without a queue).
        deadline_shedding: refuse calls whose deadline is nearer than their
            method's recent median latency.
        per_method: one limiter per method instead of one per server (for
            servers whose methods differ by orders of magnitude in latency).
        accept_queue: calls grpc's core may hold that the server has not
            taken yet; beyond it core refuses new calls itself (at random
            between this and twice this), before any Python runs, and the
            caller sees CANCELLED. None (default): grpc's own 1000. Under CPU
            saturation calls wait in that queue, unseen by the admission
            control above, until most have outlived their deadline; a small
            queue keeps goodput near capacity at 3-5x load. The cost: a burst
            larger than it that arrives while the server is busy is partly
            refused too (see README, "Overload protection"). Size it as
            capacity (calls/s) x the queueing you accept, e.g. 500/s x 30 ms = 16.
    """

    initial_limit: int = 1000
    min_limit: int = 1
    max_limit: int = 1000
    buffer: float = 0.25
    tolerance: float = 0.005
    update_interval: float = 0.05
    min_rtt_interval: float = 10.0
    min_rtt_samples: int = 20
    queue_target: float = 0.05
    deadline_shedding: bool = True
    per_method: bool = False
    accept_queue: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ConfigError("overload: need 1 <= min_limit <= initial_limit <= max_limit")
        intervals = (self.update_interval, self.min_rtt_interval, self.queue_target)
        if min(self.buffer, self.tolerance) < 0 or min(intervals) <= 0:
            raise ConfigError("overload: buffer and tolerance must be >= 0, the intervals and queue_target > 0")
        if self.min_rtt_samples < 1:
            raise ConfigError("overload: min_rtt_samples must be >= 1")
        if self.accept_queue is not None and self.accept_queue < 1:
            raise ConfigError("overload: accept_queue must be >= 1 (or None for grpc's own)")


class Rejection(NamedTuple):
    """Why a call was refused, and after how many seconds the client may try this server again."""

    reason: str  #: "concurrency", "queue", "priority", "deadline" or "rate_limit"
    retry_after: float


class LatencyMedian:
    """A method's recent median latency: the median of each batch of 64 calls, computed as the batch ends.

    The admission appends each call's latency to :attr:`batch` itself (once
    per call, without a frame) and calls :meth:`close_batch` once it holds
    :attr:`SIZE`.
    """

    __slots__ = ("batch", "median")

    SIZE = 64

    def __init__(self) -> None:
        self.batch: list[float] = []  #: the latencies of the batch so far (kept, emptied as it ends)
        self.median = 0.0  #: 0 until 64 calls were seen

    def close_batch(self) -> None:
        """The batch is whole: its median is the new one, and the next batch begins."""
        ordered = sorted(self.batch)  # a copy: handler threads may append meanwhile (a sample lost, harmless)
        self.batch.clear()
        if len(ordered) >= self.SIZE:  # else another thread closed it first
            self.median = ordered[len(ordered) // 2]


_BATCH = LatencyMedian.SIZE


class GradientLimiter:
    """An adaptive concurrency limit (see the module docstring); thread-safe.

    ``sample(rtt, alone, now)`` feeds one admitted call's handler latency
    and whether it ran alone; :attr:`limit` is read on every admission.

    The no-load latency is the median of recent calls that ran alone. A
    server that stays busy has no such calls: after ``min_rtt_interval``
    seconds without one (or an interval, before the first), the limit is pinned to
    ``min_limit`` until ``min_rtt_samples`` calls have run alone, then
    restored (Envoy's periodic min-RTT measurement, only when needed).
    """

    _ALONE = 16  # no-load samples kept

    def __init__(self, config: OverloadConfig, now: float) -> None:
        self._config = config
        self._lock = threading.Lock()
        self.limit = float(config.initial_limit)
        self.min_rtt = 0.0  #: no-load latency; 0 until first measured
        self._alone: list[float] = []  # the last _ALONE no-load samples; their median is min_rtt
        # No-load samples since the interval began: kept apart and folded into
        # _alone at its end, so that recording one is a list append.
        self.fresh_alone: list[float] = []
        self._last_alone = now
        self._pinned_from: float | None = None  # the limit to restore after a pinned measurement
        self._pinned_samples = 0
        self.window: list[float] = []  #: latencies of the interval
        self.window_end = now + config.update_interval
        self._idle_at = -math.inf  # the last admission that found nothing running (see tick)
        self.peak = 0  #: most calls running at once this interval (the admission sets it)

    def sample(self, rtt: float, alone: bool, now: float) -> None:
        """Record an admitted call's latency (``alone``: no other call ran with it); update the limit."""
        with self._lock:
            self._sample(rtt, alone, now)

    def _sample(self, rtt: float, alone: bool, now: float) -> None:
        if alone:  # a no-load sample
            self.fresh_alone.append(rtt)
            if (pinned_from := self._pinned_from) is not None:
                self._pinned_sample(pinned_from, now)
        if self._pinned_from is not None:
            return
        self.window.append(rtt)
        if now >= self.window_end:
            self._end_window(now, 0.0)

    def _fold_alone(self, now: float) -> None:
        """Move the interval's no-load samples into the kept ones (the time of the last: at most an interval off)."""
        if fresh := self.fresh_alone:
            self._alone = (self._alone + fresh)[-self._ALONE :]
            self.fresh_alone = []
            self._last_alone = now

    def tick(self, now: float, running: int) -> None:
        """An admission at ``now``: end an interval in which no call completed although ``running`` ran.

        A server flooded with calls that share its CPU completes none for a
        while; waiting for completions to lower the limit would admit a
        whole interval's flood more. No completion for an interval means
        calls take longer than it: that is the sample.

        The stall is counted from the interval's start, or from the last
        admission that found nothing running when that is later: an idle
        gap is no stall (counted as one, it crashed the limit at the first
        burst after every pause: 32 -> 1 after a 0.4 s gap, then refusals).
        """
        if running == 0:
            self._idle_at = now  # a plain store: admissions race here harmlessly
            return
        interval = self._config.update_interval
        start = max(self.window_end - interval, self._idle_at)
        if now < start + 2 * interval:
            return
        with self._lock:
            start = max(self.window_end - interval, self._idle_at)
            if self._pinned_from is None and now >= start + 2 * interval:
                self._end_window(now, now - start)

    def _end_window(self, now: float, stalled: float) -> None:
        self._fold_alone(now)
        window, self.window = self.window, []
        self.window_end = now + self._config.update_interval
        peak, self.peak = self.peak, 0
        if now - self._last_alone > self._config.min_rtt_interval:
            self._pin()  # busy for long: measure the no-load latency again
            return
        if self._alone:
            self.min_rtt = sorted(self._alone)[len(self._alone) // 2]
        if self.min_rtt > 0 and (window or stalled):
            self._update(max(stalled, sorted(window)[len(window) // 2] if window else 0.0), peak)

    def _pinned_sample(self, pinned_from: float, now: float) -> None:
        """One more no-load sample while the limit is pinned; enough of them restore it."""
        self._pinned_samples += 1
        if self._pinned_samples >= self._config.min_rtt_samples:
            self._fold_alone(now)
            self.min_rtt = sorted(self._alone)[len(self._alone) // 2]
            self.limit, self._pinned_from = pinned_from, None
            self.window, self.window_end = [], now + self._config.update_interval

    def _pin(self) -> None:
        self._pinned_from, self._pinned_samples = self.limit, 0
        self.limit = float(self._config.min_limit)

    def _update(self, sample_rtt: float, peak: int) -> None:
        cfg = self._config
        target = max(self.min_rtt * (1 + cfg.buffer), self.min_rtt + cfg.tolerance)
        gradient = min(2.0, max(0.1, target / sample_rtt)) if sample_rtt > 0 else 1.0
        if gradient < _QUEUEING:
            # Queueing: shrink from the concurrency that caused it, not from a
            # limit far above it (a high limit never reached says nothing).
            base = min(self.limit, float(max(peak, 1)))
            limit = base * gradient + math.sqrt(base)
        else:
            # No queueing, or within noise of the target (methods of different
            # latency share the limiter, so the no-load latency of the fastest
            # can put a slower one's median just above it): shrinking to the
            # peak here would refuse the next burst above it, e.g. the calls
            # a draining neighbour's clients move here.
            limit = self.limit * gradient + math.sqrt(self.limit)
            if limit > self.limit and peak < self.limit / 2:
                return  # not using the limit it has: no evidence it could take more
        self.limit = min(float(cfg.max_limit), max(float(cfg.min_limit), limit))


class Admission:
    """The admission decision for one server (or method), from the limiter and the front's signals.

    Per call: :meth:`begin` (None: the call is admitted and its handler may
    run; else the :class:`Rejection` to end it with, unrun), then for an
    admitted call :meth:`end` once its handler returned. ``running`` counts
    the admitted calls whose handler runs.

    What the front knows about a call comes in through the constructor, read
    only when the answer matters: ``share(carrier)`` its criticality share
    (asked only when the server is busy enough), ``remaining(carrier)`` its
    seconds left (None, or over 1e9, for none; asked only for methods whose
    median latency is at least a millisecond, as a faster call cannot
    usefully be refused for its deadline). The queueing delay is
    :attr:`queue_delay`, which the front keeps (asyncio: its loop's lag), or,
    given ``queued`` (calls waiting for one of ``workers`` threads), that
    many median calls shared among the workers.
    """

    YIELD = 0.5  # seconds less critical classes yield after a more critical call was refused

    def __init__(
        self, config: OverloadConfig, now: float, *,
        share: Callable[[Any], float] | None = None, remaining: Callable[[Any], float | None] | None = None,
        queued: Callable[[], int] | None = None, workers: int = 1,
    ) -> None:  # fmt: skip
        self.config = config
        self.limiter = GradientLimiter(config, now)
        self.latency = LatencyMedian()
        # The admitted calls whose handler runs, one entry each: list.append
        # and list.pop are atomic, so handler threads keep an exact count
        # without a lock (two acquisitions a call cost as much as the rest).
        self._running: list[None] = []
        self.queue_delay = 0.0  #: seconds calls wait before their handler runs (kept by the front)
        self._share = share if share is not None else _critical
        self._remaining = remaining if config.deadline_shedding else None
        # What changes with the median, kept as each batch of latencies ends:
        # the reader of a call's time left (None while the median is under a
        # millisecond) and a queued call's wait for a worker.
        self._read_deadline: Callable[[Any], float | None] | None = None
        self._wait_per_queued = 0.0
        self._batch = self.latency.batch  # the same list for good (emptied, not replaced)
        self._queued = queued
        self._per_worker = 1.0 / workers
        self._least_delay = config.queue_target * _LEAST  # a queue even the least critical may join
        # The start of the call that began with none running, while none began
        # since (else -1): at its end, that call ran alone (a no-load sample).
        self._solo = -1.0
        self._yield_below = 0.0  # classes with a smaller share are refused until _yield_until
        self._yield_until = 0.0

    @property
    def running(self) -> int:
        """Admitted calls whose handler runs now."""
        return len(self._running)

    def begin(self, now: float, carrier: Any = None) -> Rejection | None:
        """Admit a call arriving at ``now`` (None: its handler may run; pass ``now`` to :meth:`end`) or refuse it.

        The common case, a server with room even for the least critical
        class, is decided here without another call (the per-call cost of
        admission control is what a server pays when it is not overloaded).
        """
        limiter, calls = self.limiter, self._running
        running = len(calls)
        if now >= limiter.window_end:
            limiter.tick(now, running)
        if running >= limiter.peak:
            limiter.peak = running + 1  # racy by design: a hint for the limiter, not a count
        queued = self._queued
        delay = self.queue_delay if queued is None else queued() * self._wait_per_queued
        if self._yield_below != 0.0 or running >= limiter.limit * _LEAST or delay > self._least_delay:
            rejection = self._contended(running, delay, now, carrier)
            if rejection is not None:
                return rejection
        if (reader := self._read_deadline) is not None:
            remaining = reader(carrier)
            if remaining is not None and remaining < self.latency.median:
                return Rejection("deadline", 0.0)
        calls.append(None)
        # Threads racing between these two lines can take a call that ran
        # with another for one that ran alone: one no-load sample of 16, rarely.
        self._solo = now if running == 0 else -1.0
        return None

    def end(self, started: float, now: float) -> None:
        """The handler of the call admitted at ``started`` returned at ``now``."""
        self._running.pop()
        latency = now - started
        batch = self._batch
        batch.append(latency)
        if len(batch) >= _BATCH:
            self._close_batch()
        # Alone: it began with none running and none began since.
        limiter = self.limiter
        if now >= limiter.window_end or limiter._pinned_from is not None:
            limiter.sample(latency, started == self._solo, now)
        else:  # the common case of sample, without its frames or lock (appends are atomic)
            limiter.window.append(latency)
            if started == self._solo:
                limiter.fresh_alone.append(latency)

    def _close_batch(self) -> None:
        latency = self.latency
        latency.close_batch()
        median = latency.median
        self._wait_per_queued = median * self._per_worker
        # A call faster than a millisecond is not worth refusing for its deadline.
        self._read_deadline = self._remaining if median >= 0.001 else None

    def _contended(self, running: int, delay: float, now: float, carrier: Any) -> Rejection | None:
        """The decision for a busy server: by the call's criticality (see the class docstring)."""
        limiter = self.limiter
        part = self._share(carrier)
        if part < self._yield_below:
            if now < self._yield_until:
                return Rejection("priority", self._retry_after())
            self._yield_below = 0.0
        if running >= limiter.limit * part and running >= 1:
            return self._refused(Rejection("concurrency", self._retry_after()), part, now)
        if delay > self.config.queue_target * part:
            return self._refused(Rejection("queue", max(delay, self._retry_after())), part, now)
        return None

    def _refused(self, rejection: Rejection, share: float, now: float) -> Rejection:
        """Refusing a call makes every less critical class yield for a while.

        The limit alone leaves each class a fixed part of it, so sheddable
        work would keep taking capacity critical calls are being refused
        for; instead, once a class is refused, the classes below it are
        refused outright until none of it has been for ``YIELD`` seconds.
        """
        if share >= self._yield_below:
            self._yield_below = share
            self._yield_until = now + self.YIELD
        return rejection

    def _retry_after(self) -> float:
        """A hint for clients: about one median call, at least a millisecond."""
        return max(0.001, self.latency.median)


def _critical(carrier: Any) -> float:
    """Every call is CRITICAL (a front that does not say)."""
    return 1.0


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; thread-safe."""

    __slots__ = ("_lock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigError("rate limit: rate must be > 0 and burst >= 1")
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._stamp = now
        self._lock = threading.Lock()

    def take(self, now: float) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there is."""
        with self._lock:
            tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if tokens >= 1:
                self._tokens = tokens - 1
                return 0.0
            self._tokens = tokens
            return (1 - tokens) / self.rate


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket on a server's calls (``ServerConfig.rate_limits``).

    Attributes:
        rate: calls per second.
        burst: calls allowed at once after a quiet time (default: one
            second's worth, at least 1).
        method: ``"pkg.Service/Method"``, ``"pkg.Service"`` (each of its
            methods has its own bucket) or ``"*"`` (every method, each its own).
        per_caller: one bucket per caller (the authenticated principal, API
            key name or certificate name; "anonymous" for the rest) instead
            of one for all.
    """

    rate: float
    burst: float | None = None
    method: str = "*"
    per_caller: bool = False

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ConfigError(f"rate limit: rate must be > 0, got {self.rate!r}")
        if self.burst is not None and self.burst < 1:
            raise ConfigError(f"rate limit: burst must be >= 1, got {self.burst!r}")
        if not self.method or (self.method != "*" and self.method.startswith("/")):
            raise ConfigError(
                f"rate limit: method must be 'pkg.Service/Method', 'pkg.Service' or '*', got {self.method!r}"
            )

    def applies_to(self, method: str) -> bool:
        """Whether this limit covers ``method`` ("/pkg.Service/Method")."""
        name = method.lstrip("/")
        return self.method == "*" or name == self.method or name.rpartition("/")[0] == self.method


class RateLimiter:
    """The buckets of one rate limit on one method; per caller ones are bounded (least recently used go)."""

    MAX_CALLERS = 10_000

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self._burst = limit.burst if limit.burst is not None else max(1.0, limit.rate)
        self._shared = None if limit.per_caller else TokenBucket(limit.rate, self._burst, now)
        self._callers: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, caller: str, now: float) -> float:
        """0.0 when the call may run, else the seconds until it may."""
        bucket = self._shared
        if bucket is None:
            with self._lock:
                bucket = self._callers.pop(caller, None)
                if bucket is None:
                    bucket = TokenBucket(self.limit.rate, self._burst, now)
                    if len(self._callers) >= self.MAX_CALLERS:
                        del self._callers[next(iter(self._callers))]
                self._callers[caller] = bucket  # most recent last
        return bucket.take(now)
