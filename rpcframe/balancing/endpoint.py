"""Endpoints and their live statistics (pure: no I/O, clock injected)."""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._core.ewma import PeakEWMA
from .._core.throttle import AdaptiveThrottle

__all__ = ["IGNORED", "REJECTED", "SUCCESS", "Endpoint", "EndpointStats", "Outcome", "backend_address"]

Clock = Callable[[], float]

#: Latency assumed for an endpoint that has not answered yet (seconds).
DEFAULT_RTT = 0.001
#: A failed call counts as at least this many times the latency estimate...
FAILURE_PENALTY = 4.0
#: ...and at least this long (seconds).
MIN_FAILURE_LATENCY = 0.005
#: Weight of each new sample in the mean latency (:attr:`EndpointStats.latency`) of a busy endpoint...
LATENCY_WEIGHT = 0.1
#: ...growing with the time since the previous sample, to 1 after this many seconds (a stale mean is replaced).
LATENCY_STALE = 2.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend address as a resolver reports it.

    Attributes:
        address: ``host:port`` (``[v6]:port`` for IPv6) or ``unix:path``.
        weight: relative share for ``weighted_round_robin`` (>= 1).
        zone: locality label, free for policies to use.
        metadata: other resolver-provided key/value pairs.
    """

    address: str
    weight: int = 1
    zone: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


def backend_address(address: str) -> str:
    """The server address of a balancer entry: ``host:port#2`` is a channel's second connection to ``host:port``.

    (``ChannelConfig.connections_per_endpoint``: each connection is an entry of its own.)
    """
    base, sep, number = address.rpartition("#")
    return base if sep and number.isdigit() else address


class Outcome(enum.IntEnum):
    """How a call ended, as far as balancing cares."""

    SUCCESS = 0  # includes application errors (NOT_FOUND, INVALID_ARGUMENT, ...)
    FAILURE = 1  # the endpoint failed (UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS, timeouts)
    IGNORED = 2  # cancelled by the caller: says nothing about the endpoint
    REJECTED = 3  # refused unrun as overloaded: a failure, and what client throttling counts


#: :class:`Outcome` members as module constants for per-call code (here and the client fronts): on
#: Python 3.11 ``Outcome.X`` goes through the enum metaclass's ``__getattr__``, ~1,000 instructions a lookup.
SUCCESS, IGNORED, REJECTED = Outcome.SUCCESS, Outcome.IGNORED, Outcome.REJECTED


class EndpointStats:
    """Live state of one endpoint, shared by every picker snapshot.

    ``done`` is the done-callback a pick returns: it takes the outcome and the
    latency in seconds and returns True when the balancer should rebuild its
    picker (an outlier ejection is due). ``handle`` is whatever the client
    front attaches (its channel and per-method calls); the core never looks.
    """

    __slots__ = (
        "_clock", "_lock", "_start_sum", "consecutive_failures", "ejected_until", "ejections", "endpoint",
        "ewma", "failure_threshold", "handle", "inflight", "last_begin", "latency", "latency_at", "left_out_at",
        "peak_ewma", "ready_since", "streams", "throttle",
    )  # fmt: skip

    def __init__(
        self,
        endpoint: Endpoint,
        clock: Clock,
        *,
        decay: float = 10.0,
        initial_latency: float = 0.0,
        failure_threshold: int = 5,
    ) -> None:
        self.endpoint = endpoint
        self._clock = clock
        self._lock = threading.Lock()
        self.ewma = PeakEWMA(decay, initial_latency, clock())
        #: Whether :attr:`ewma` is kept (the balancer clears it for policies that never read it).
        self.peak_ewma = True
        #: Mean latency of recent successful calls (seconds; 0 until the first answer), see :meth:`done`.
        self.latency = initial_latency
        self.latency_at = -math.inf  # when it was last sampled
        self.last_begin = -math.inf  # when a call last started here
        self.left_out_at = math.inf  # since when filtered_p2c has left it out as a latency outlier (inf: it has not)
        self.inflight = 0
        self.streams = 0  # in-flight calls that are streams (not aged, see cost())
        self._start_sum = 0.0  # sum of the start times of in-flight unary calls
        self.consecutive_failures = 0
        self.failure_threshold = failure_threshold
        self.ejections = 0
        self.ejected_until = -math.inf
        self.ready_since = -math.inf
        self.handle: Any = None
        self.throttle: AdaptiveThrottle | None = None  #: client-side throttling, when the channel has it

    @property
    def address(self) -> str:
        """The endpoint's address."""
        return self.endpoint.address

    def begin(self, now: float | None = None) -> None:
        """Count a call as started on this endpoint (at ``now``, when the picker has read the clock already)."""
        if now is None:
            now = self._clock()
        # acquire/release rather than `with`: half the instructions (the lock is taken twice per call).
        lock = self._lock
        lock.acquire()
        try:
            self.inflight += 1
            self._start_sum += now
            self.last_begin = now
        finally:
            lock.release()

    def as_stream(self) -> None:
        """Mark the call just begun as a stream: its age says nothing of latency."""
        now = self._clock()
        with self._lock:
            self.streams += 1
            self._start_sum -= now

    def done(self, outcome: Outcome, latency: float) -> bool:
        """Record a finished call; True when it should trigger an ejection check.

        ``latency`` is the call's duration in seconds; a negative value ends
        a stream (see :meth:`as_stream`).
        """
        now = self._clock()
        lock = self._lock
        lock.acquire()
        try:
            self.inflight -= 1
            if latency < 0:
                self.streams -= 1
            elif self.inflight == self.streams:
                self._start_sum = 0.0  # nothing aged in flight: drop rounding drift
            else:
                self._start_sum -= now - latency
            if outcome is IGNORED:
                return False
            t = self.throttle
            if t is not None:
                # AdaptiveThrottle.record's common case (a healthy endpoint answered), inlined: once per call.
                if outcome is SUCCESS and t.p == 0.0 and t.requested > t._min and now < t._next:
                    t._requests[t._index] += 1
                    t.requested += 1
                else:
                    t.record(outcome is not REJECTED, now)
            if latency < 0:
                return False
            if outcome is SUCCESS:
                if self.peak_ewma:
                    self.ewma.observe(latency, now)
                self.consecutive_failures = 0
                ejection_due = False
            else:
                # A failing endpoint often fails fast; counted as fast it would
                # attract more calls (a "black hole"), so a failure costs at least
                # several times the current estimate.
                if self.peak_ewma:
                    self.ewma.observe(max(latency, FAILURE_PENALTY * self.ewma.value, MIN_FAILURE_LATENCY), now)
                latency = max(latency, FAILURE_PENALTY * self.latency, MIN_FAILURE_LATENCY)
                self.consecutive_failures += 1
                ejection_due = self.consecutive_failures == self.failure_threshold
            # The sample folded into the mean latency (inline: once per call). An exponential mean
            # whose sample weight is LATENCY_WEIGHT for a busy endpoint and grows with the time since
            # the previous sample: the first answer after seconds without calls (a probe of an
            # endpoint the picker avoided) replaces a stale mean, so a recovered backend is seen as
            # recovered at once. Floored at 1 us: 0 means "not known yet".
            if latency < 1e-6:
                latency = 1e-6
            weight = (now - self.latency_at) / LATENCY_STALE
            if weight < LATENCY_WEIGHT:
                weight = LATENCY_WEIGHT
            elif weight > 1.0:
                weight = 1.0
            self.latency += weight * (latency - self.latency)
            self.latency_at = now
            return ejection_due
        finally:
            lock.release()

    def cost(self, now: float) -> float:
        """Peak-EWMA load score: latency estimate x (in-flight + 1).

        An endpoint without a latency sample yet is assumed to answer in
        ``DEFAULT_RTT``, so it is tried. While unary calls are in flight the
        estimate is at least their mean age: a backend that has not answered
        for a while looks slow before its first slow answer arrives (without
        this, a new slow endpoint soaks up calls until one completes).
        """
        estimate = self.ewma.current(now) or DEFAULT_RTT
        aged = self.inflight - self.streams
        if aged > 0:
            age = now - self._start_sum / aged
            if age > estimate:
                estimate = age
        return estimate * (self.inflight + 1)

    def effective_latency(self, now: float, unknown: float) -> float:
        """:attr:`latency`, or the mean age of the unary calls in flight when that is longer.

        ``unknown`` stands in for an endpoint that has not answered yet. The
        age term makes an endpoint that turned slow look slow before its
        first slow answer arrives.
        """
        estimate = self.latency or unknown
        aged = self.inflight - self.streams
        if aged > 0:
            age = now - self._start_sum / aged
            if age > estimate:
                return age
        return estimate

    def warmth(self, now: float, window: float) -> float:
        """Slow-start factor in (0, 1]: how far the endpoint is into its ramp."""
        if window <= 0:
            return 1.0
        age = now - self.ready_since
        return 1.0 if age >= window else max(0.1, age / window)

    def __repr__(self) -> str:
        return f"EndpointStats({self.address!r}, inflight={self.inflight})"
