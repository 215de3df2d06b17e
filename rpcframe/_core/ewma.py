"""Peak-EWMA latency estimate (Finagle/Linkerd style), pure and clock-driven.

A sample above the current estimate replaces it at once (the *peak*): a
backend that turns slow is penalised immediately. Samples below decay it
smoothly with weight ``exp(-elapsed / decay)``, so recovery is gradual and
independent of the request rate. Reading the estimate also decays it toward
zero, so an endpoint that is not picked for a while gets tried again.
"""

from __future__ import annotations

import math

__all__ = ["PeakEWMA"]


class PeakEWMA:
    """Latency estimate in seconds; not thread-safe on its own (callers lock)."""

    __slots__ = ("_decay", "stamp", "value")

    def __init__(self, decay: float, initial: float, now: float) -> None:
        self._decay = decay
        self.value = initial
        self.stamp = now

    def observe(self, sample: float, now: float) -> None:
        """Fold in one latency sample taken at ``now``."""
        if sample > self.value:
            self.value = sample
        else:
            elapsed = now - self.stamp
            weight = math.exp(-elapsed / self._decay) if elapsed > 0 else 1.0
            self.value = self.value * weight + sample * (1.0 - weight)
        self.stamp = now

    def current(self, now: float) -> float:
        """The estimate at ``now``, decayed toward zero since the last sample."""
        elapsed = now - self.stamp
        if elapsed <= 0:
            return self.value
        return self.value * math.exp(-elapsed / self._decay)
