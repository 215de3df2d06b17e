"""Hedging: a backup request when the first is slower than most.

"The Tail at Scale" (Dean and Barroso): send a second copy of a request to
another replica once the first has been outstanding longer than, say, the
95th-percentile latency; take whichever answer comes first and cancel the
other. Only for methods the contract marks ``NO_SIDE_EFFECTS`` or
``IDEMPOTENT``, and within a budget on extra load.

The delay adapts: :class:`LatencyWindow` keeps the latest latencies of a
method and recomputes the percentile every ``refresh`` samples, so the hot
path only appends to a ring. Pure: no clocks, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["HedgePolicy", "LatencyWindow"]


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """When a backup request is sent.

    Attributes:
        max_attempts: copies in flight at most, the first included.
        delay: fixed seconds before each backup; ``None`` (default) adapts it
            to the ``percentile`` of the method's recent latencies.
        percentile: latency percentile the adaptive delay follows (0.95).
        min_delay: floor of the adaptive delay, seconds, so a very fast
            method is not hedged on scheduling noise.
        min_samples: latencies needed before adaptive hedging starts.
        max_extra_load: backups allowed as a share of the method's channel's
            requests over the budget window (0.05 = 5 %).
    """

    max_attempts: int = 2
    delay: float | None = None
    percentile: float = 0.95
    min_delay: float = 0.001
    min_samples: int = 50
    max_extra_load: float = 0.05

    def __post_init__(self) -> None:
        if self.max_attempts < 2:
            raise ConfigError(f"hedging needs max_attempts >= 2, got {self.max_attempts!r}")
        if self.delay is not None and self.delay < 0:
            raise ConfigError(f"delay must be >= 0, got {self.delay!r}")
        if not 0 < self.percentile < 1:
            raise ConfigError(f"percentile must be within (0, 1), got {self.percentile!r}")
        if self.min_delay < 0 or self.min_samples < 1:
            raise ConfigError("min_delay must be >= 0 and min_samples >= 1")
        if not 0 < self.max_extra_load <= 1:
            raise ConfigError(f"max_extra_load must be within (0, 1], got {self.max_extra_load!r}")


class LatencyWindow:
    """The latest ``size`` latencies of one method and their percentile."""

    __slots__ = ("_count", "_percentile", "_refresh", "_ring", "_size", "value")

    def __init__(self, percentile: float, size: int = 1000, refresh: int = 50) -> None:
        self._percentile = percentile
        self._size = size
        self._refresh = refresh
        self._ring: list[float] = []
        self._count = 0
        #: The percentile as of the last refresh; ``None`` until enough samples.
        self.value: float | None = None

    def add(self, latency: float) -> None:
        """Record one successful call's latency in seconds."""
        if len(self._ring) < self._size:
            self._ring.append(latency)
        else:
            self._ring[self._count % self._size] = latency
        self._count += 1
        if self._count % self._refresh == 0:
            ordered = sorted(self._ring)
            self.value = ordered[min(len(ordered) - 1, int(self._percentile * len(ordered)))]

    @property
    def samples(self) -> int:
        """Latencies recorded so far."""
        return self._count

    def delay(self, policy: HedgePolicy) -> float | None:
        """Seconds before a backup is sent under ``policy``; ``None``: do not hedge yet."""
        if policy.delay is not None:
            return policy.delay
        if self._count < policy.min_samples or self.value is None:
            return None
        return self.value if self.value > policy.min_delay else policy.min_delay
