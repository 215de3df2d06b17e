"""Passive outlier detection: eject endpoints that keep failing (pure).

An endpoint that fails ``consecutive_failures`` calls in a row is ejected
from picks for ``base_ejection_time x (times ejected)``, capped at
``max_ejection_time``; at most ``max_ejection_percent`` of the connected
endpoints are ejected at once (Envoy's outlier detection, simplified).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .._core.errors import ConfigError
from .endpoint import EndpointStats

__all__ = ["OutlierConfig", "update_ejections"]


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Outlier-detection settings (``enabled=False`` turns it off)."""

    enabled: bool = True
    consecutive_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ConfigError("outlier.consecutive_failures must be >= 1")
        if not 0 < self.base_ejection_time <= self.max_ejection_time:
            raise ConfigError("outlier ejection times must satisfy 0 < base_ejection_time <= max_ejection_time")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ConfigError("outlier.max_ejection_percent must be within 0..100")


def update_ejections(endpoints: Sequence[EndpointStats], config: OutlierConfig, now: float) -> float:
    """Eject endpoints past the failure threshold, within the allowed share.

    Returns when the next ejection ends (``inf`` if none is ejected), so the
    caller knows when to rebuild its picker.
    """
    if not config.enabled:
        return math.inf
    ejected = sum(1 for s in endpoints if s.ejected_until > now)
    allowed = math.floor(len(endpoints) * config.max_ejection_percent / 100)
    for stats in endpoints:
        if ejected >= allowed:
            break
        if stats.ejected_until <= now and stats.consecutive_failures >= config.consecutive_failures:
            stats.ejections += 1
            duration = min(config.base_ejection_time * stats.ejections, config.max_ejection_time)
            stats.ejected_until = now + duration
            stats.consecutive_failures = 0
            ejected += 1
    return min((s.ejected_until for s in endpoints if s.ejected_until > now), default=math.inf)
