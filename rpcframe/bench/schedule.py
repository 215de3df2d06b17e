"""The open-loop schedule: when each call is meant to be sent.

An open-loop load sends call ``i`` at ``start + i / rps`` whether or not
earlier calls have finished. Its latency is measured from that *intended*
send time, not from when a free caller got round to sending it: if the
server stalls, the calls queued behind the stall are charged the time they
waited. Measuring from the actual send time instead hides exactly those
waits ("coordinated omission"), because a stalled closed-loop client simply
stops sending.

The schedule is pure arithmetic on times the caller passes in, so tests
drive it with a fake clock.
"""

from __future__ import annotations

import math

__all__ = ["OpenLoopSchedule"]


class OpenLoopSchedule:
    """Intended send times of a constant-rate load.

    Args:
        rps: arrivals per second.
        start: time of the first send (any monotonic clock, in seconds).
        duration: seconds the schedule spans; sends at or after
            ``start + duration`` are not part of it. ``None``: unbounded.
        total: most sends in the schedule. ``None``: unbounded.
    """

    __slots__ = ("_interval", "duration", "rps", "start", "total")

    def __init__(self, rps: float, start: float, duration: float | None = None, total: int | None = None) -> None:
        if not rps > 0:
            raise ValueError(f"rps must be > 0, got {rps!r}")
        self.rps = rps
        self.start = start
        self.duration = duration
        self.total = total
        self._interval = 1.0 / rps

    def send_time(self, index: int) -> float:
        """When send ``index`` (0-based) is due."""
        # Multiply instead of accumulating: no drift over millions of sends.
        return self.start + index * self._interval

    def count(self) -> int | None:
        """Number of sends in the schedule, or ``None`` if unbounded."""
        counts = [self.total] if self.total is not None else []
        if self.duration is not None:
            # Sends strictly before start + duration; the epsilon keeps
            # 4 rps x 1 s at 4 sends despite float rounding.
            counts.append(max(0, math.ceil(self.duration * self.rps - 1e-9)))
        return min(counts) if counts else None

    def due(self, now: float) -> int:
        """How many sends are due at ``now`` (sends 0..due-1 are)."""
        if now < self.start:
            return 0
        due = math.floor((now - self.start) * self.rps + 1e-9) + 1
        limit = self.count()
        return due if limit is None else min(due, limit)

    def lag(self, index: int, now: float) -> float:
        """Seconds send ``index`` is late at ``now`` (negative: still early)."""
        return now - self.send_time(index)
