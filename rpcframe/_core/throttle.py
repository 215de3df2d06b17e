"""Client-side adaptive throttling (Google SRE book, "Handling Overload").

Each endpoint keeps, over the last ``window`` seconds, the requests the
client meant to send it and the ones it accepted (did not refuse as
overloaded). A request is refused locally, without being sent, with
probability ``max(0, (requests - k * accepts) / (requests + 1))``: nothing
while the endpoint accepts more than 1/k of the calls, then a growing share,
so a backend that sheds most calls is not sent the calls it would shed
anyway. ``k = 2`` lets through twice what it accepts, so it can show it has
recovered.

Pure and clock-driven; the counters take no lock (a lost increment under a
race only nudges an estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["AdaptiveThrottle", "ThrottleConfig"]


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """Client-side throttling (``ChannelConfig.throttle``; None turns it off).

    Attributes:
        k: requests sent per request accepted before the client starts
            refusing locally (the SRE book's K; 2 by default).
        window: seconds of history.
        min_requests: no local refusal before this many requests in the
            window (the formula refuses half the calls after one refusal).
    """

    k: float = 2.0
    window: float = 30.0
    min_requests: int = 10

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"throttle.k must be >= 1, got {self.k!r}")
        if self.window <= 0 or self.min_requests < 0:
            raise ConfigError("throttle: window must be > 0 and min_requests >= 0")


class AdaptiveThrottle:
    """Requests and accepts of one endpoint over a sliding window of 10 buckets."""

    __slots__ = (
        "_index", "_k", "_min", "_next", "_refusals", "_requests", "_slot", "_span", "p", "refused", "requested",
    )  # fmt: skip

    BUCKETS = 10

    def __init__(self, config: ThrottleConfig, now: float) -> None:
        self._k = config.k
        self._min = config.min_requests
        self._span = config.window / self.BUCKETS
        self._requests = [0] * self.BUCKETS
        # Refusals rather than accepts are counted: an accept, nearly every call, is then one count less.
        self._refusals = [0] * self.BUCKETS
        self._slot = int(now / self._span)
        self._index = self._slot % self.BUCKETS  # the bucket of the current slot
        self._next = (self._slot + 1) * self._span  # when the next slot starts
        self.requested = 0  #: requests in the window
        self.refused = 0  #: requests in the window the endpoint did not accept
        self.p = 0.0  #: the probability of refusing the next request locally

    @property
    def accepted(self) -> int:
        """Accepts in the window."""
        return self.requested - self.refused

    def record(self, accepted: bool, now: float) -> None:
        """One request, accepted by the endpoint or not (refused as overloaded, or locally)."""
        if now >= self._next:
            self._roll(int(now / self._span))
        index = self._index
        self._requests[index] += 1
        self.requested += 1
        if accepted:
            # Every call of a healthy endpoint lands here: an accept cannot
            # raise p from 0 once the formula applies, so skip recomputing it.
            if self.p == 0.0 and self.requested > self._min:
                return
        else:
            self._refusals[index] += 1
            self.refused += 1
        self._update()

    def _update(self) -> None:
        requested = self.requested
        accepted = requested - self.refused
        self.p = 0.0 if requested < self._min else max(0.0, (requested - self._k * accepted) / (requested + 1))

    def _roll(self, slot: int) -> None:
        """Drop the buckets older than the window."""
        for gone in range(max(self._slot + 1, slot - self.BUCKETS + 1), slot + 1):
            index = gone % self.BUCKETS
            self.requested -= self._requests[index]
            self.refused -= self._refusals[index]
            self._requests[index] = self._refusals[index] = 0
        self._slot = slot
        self._index = slot % self.BUCKETS
        self._next = (slot + 1) * self._span
        self._update()
