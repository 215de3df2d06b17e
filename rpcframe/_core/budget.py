"""Rate budgets: extra attempts allowed as a share of recent requests.

Retries and hedges add load exactly when a service is least able to take it;
a budget caps them at a fraction of the requests seen over the last ``ttl``
seconds plus a small floor per second, as Finagle's and Linkerd's retry
budgets do (defaults: 20 % plus 10 per second over 10 s). A channel's
sync and asyncio calls share its budgets.

Pure and clock-driven: ``now`` comes in as an argument. Deposits are on
every call's hot path, so they are a bucket lookup and an increment; the
rare withdrawal does the summing.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["BudgetConfig", "RateBudget"]


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """How many extra attempts a channel may make.

    Attributes:
        ratio: extra attempts allowed per request over the window (0.2 = 20 %).
        min_per_second: extra attempts always allowed per second, so a
            channel with little traffic can still retry.
        ttl: seconds over which requests and extra attempts are counted.
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 1000:
            raise ConfigError(f"ratio must be >= 0, got {self.ratio!r}")
        if self.min_per_second < 0:
            raise ConfigError(f"min_per_second must be >= 0, got {self.min_per_second!r}")
        if self.ttl < 1:
            raise ConfigError(f"ttl must be >= 1 s, got {self.ttl!r}")


class RateBudget:
    """Counts requests and extra attempts in one-second buckets over ``ttl``."""

    __slots__ = ("_from", "_i", "_lock", "_requests", "_spent", "_stamps", "_n", "_until", "config")

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        self._n = math.ceil(config.ttl)
        self._stamps = [-1] * self._n  # the second each bucket currently counts
        self._requests = [0] * self._n
        self._spent = [0] * self._n
        self._lock = threading.Lock()
        # The bucket the last deposit found and its second, [_from, _until): deposits within that
        # second skip the int(), the modulo and the stamp check (most deposits).
        self._i, self._from, self._until = 0, math.inf, -math.inf

    def deposit(self, now: float) -> None:
        """Count one request (every call, retried or not, calls this once)."""
        # A lost increment under a thread race only makes the budget a hair
        # stricter; not worth a lock on every call.
        if self._from <= now < self._until:
            self._requests[self._i] += 1
            return
        second = int(now)
        i = second % self._n
        if self._stamps[i] != second:
            with self._lock:
                if self._stamps[i] != second:
                    self._stamps[i] = second
                    self._requests[i] = 0
                    self._spent[i] = 0
        self._requests[i] += 1
        self._i, self._from, self._until = i, float(second), second + 1.0

    def _window(self, now: float) -> tuple[int, int]:
        oldest = int(now) - self._n
        requests = spent = 0
        for stamp, r, s in zip(self._stamps, self._requests, self._spent, strict=True):
            if stamp > oldest:
                requests += r
                spent += s
        return requests, spent

    def try_withdraw(self, now: float) -> bool:
        """Take one extra attempt from the budget; False when it is spent."""
        cfg = self.config
        with self._lock:
            requests, spent = self._window(now)
            if spent + 1 > cfg.ratio * requests + cfg.min_per_second * cfg.ttl:
                return False
            second = int(now)
            i = second % self._n
            if self._stamps[i] != second:
                self._stamps[i] = second
                self._requests[i] = 0
                self._spent[i] = 0
            self._spent[i] += 1
            return True

    def usage(self, now: float) -> tuple[int, int]:
        """(requests, extra attempts) counted over the window, for stats and tests."""
        with self._lock:
            return self._window(now)
