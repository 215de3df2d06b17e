"""Pickers: immutable snapshots that choose an endpoint per call.

A picker never blocks and does no I/O. The balancer builds a new one from the
usable endpoints whenever an endpoint's state changes; the endpoints' live
statistics (:class:`EndpointStats`) are shared between snapshots.

``pick()`` counts the call as started and returns ``(stats, done)``; the
caller must call ``done(outcome, latency_seconds)`` exactly once.

Policies (``ChannelConfig.policy``): ``pick_first``, ``round_robin``,
``least_request`` (power of two choices on in-flight calls), ``peak_ewma``
(power of two choices on peak-EWMA latency x (in-flight + 1); the default)
and ``weighted_round_robin`` (weights from resolver metadata). User policies
are added with :func:`register_policy`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .endpoint import EndpointStats, Outcome

__all__ = [
    "NoEndpointError",
    "Pick",
    "Picker",
    "PickerContext",
    "available_policies",
    "build_picker",
    "register_policy",
]

Done = Callable[[Outcome, float], bool]
Pick = tuple[EndpointStats, Done]


class NoEndpointError(Exception):
    """No endpoint can take a call; the message says why."""


@dataclass(frozen=True)
class PickerContext:
    """What a policy may use besides the endpoints.

    Attributes:
        clock: monotonic seconds (a fake in tests).
        slow_start: seconds over which a newly ready endpoint ramps up.
        rng: source of randomness (seeded in tests).
    """

    clock: Callable[[], float]
    slow_start: float = 0.0
    rng: random.Random = field(default_factory=random.Random)


class Picker(Protocol):
    """An immutable choice function over a fixed list of endpoints."""

    endpoints: tuple[EndpointStats, ...]

    def pick(self) -> Pick:
        """Choose an endpoint for one call (raises NoEndpointError if none)."""
        ...


PickerFactory = Callable[[tuple[EndpointStats, ...], PickerContext], Picker]


class ErrorPicker:
    """Picker with no endpoints: every pick fails with ``reason``."""

    endpoints: tuple[EndpointStats, ...] = ()

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def pick(self) -> Pick:
        raise NoEndpointError(self.reason)


class _Single:
    """One endpoint: every policy degenerates to it, so skip the policy."""

    def __init__(self, endpoints: tuple[EndpointStats, ...], ctx: PickerContext) -> None:
        self.endpoints = endpoints
        self._only = endpoints[0]

    def pick(self) -> Pick:
        only = self._only
        only.begin()
        return only, only.done


class PickFirst:
    """Always the first usable endpoint in resolver order."""

    def __init__(self, endpoints: tuple[EndpointStats, ...], ctx: PickerContext) -> None:
        self.endpoints = endpoints
        self._first = endpoints[0]

    def pick(self) -> Pick:
        first = self._first
        first.begin()
        return first, first.done


def _warm_until(endpoints: Sequence[EndpointStats], ctx: PickerContext) -> float:
    """Until when some endpoint is still ramping up (-inf if none is)."""
    if ctx.slow_start <= 0:
        return -math.inf
    return max((s.ready_since + ctx.slow_start for s in endpoints), default=-math.inf)


class RoundRobin:
    """Each endpoint in turn, from a random start so clients do not align."""

    def __init__(self, endpoints: tuple[EndpointStats, ...], ctx: PickerContext) -> None:
        self.endpoints = endpoints
        self._cycle = self._make_cycle(endpoints)
        self._n = len(self._cycle)
        self._next = itertools.count(ctx.rng.randrange(self._n)).__next__  # atomic in CPython
        self._ctx = ctx
        self._warm_until = _warm_until(endpoints, ctx)

    @staticmethod
    def _make_cycle(endpoints: tuple[EndpointStats, ...]) -> tuple[EndpointStats, ...]:
        return endpoints

    def pick(self) -> Pick:
        stats = self._cycle[self._next() % self._n]
        if self._warm_until > -math.inf:
            stats = self._slow_start(stats)
        stats.begin()
        return stats, stats.done

    def _slow_start(self, stats: EndpointStats) -> EndpointStats:
        ctx = self._ctx
        now = ctx.clock()
        if now < self._warm_until and ctx.rng.random() > stats.warmth(now, ctx.slow_start):
            return self._cycle[self._next() % self._n]  # skip a warming endpoint this turn
        return stats


class WeightedRoundRobin(RoundRobin):
    """Round robin over a smooth weighted cycle (weights from the resolver)."""

    _MAX_CYCLE = 1000

    @staticmethod
    def _make_cycle(endpoints: tuple[EndpointStats, ...]) -> tuple[EndpointStats, ...]:
        weights = [max(1, s.endpoint.weight) for s in endpoints]
        total = sum(weights)
        if total > WeightedRoundRobin._MAX_CYCLE:
            weights = [max(1, round(w * WeightedRoundRobin._MAX_CYCLE / total)) for w in weights]
            total = sum(weights)
        # nginx's smooth weighted round robin: interleaves instead of bursting.
        current = [0] * len(weights)
        cycle = []
        for _ in range(total):
            for i, w in enumerate(weights):
                current[i] += w
            best = max(range(len(weights)), key=current.__getitem__)
            current[best] -= total
            cycle.append(endpoints[best])
        return tuple(cycle)


class _PowerOfTwo:
    """Power of two random choices on a load score (lower wins)."""

    def __init__(self, endpoints: tuple[EndpointStats, ...], ctx: PickerContext) -> None:
        self.endpoints = endpoints
        self._n = len(endpoints)
        self._random = ctx.rng.random
        self._clock = ctx.clock
        self._slow_start = ctx.slow_start
        self._warm_until = _warm_until(endpoints, ctx)

    def _score(self, stats: EndpointStats, now: float) -> float:
        raise NotImplementedError

    def pick(self) -> Pick:
        n, rand = self._n, self._random
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        a, b = self.endpoints[i], self.endpoints[j]
        now = self._clock()
        score_a, score_b = self._score(a, now), self._score(b, now)
        if now < self._warm_until:
            score_a /= a.warmth(now, self._slow_start)
            score_b /= b.warmth(now, self._slow_start)
        chosen = a if score_a <= score_b else b
        chosen.begin()
        return chosen, chosen.done


class LeastRequest(_PowerOfTwo):
    """Fewer calls in flight wins."""

    def _score(self, stats: EndpointStats, now: float) -> float:
        return float(stats.inflight + 1)  # +1 keeps the slow-start division meaningful at 0


class PeakEwma(_PowerOfTwo):
    """Lower peak-EWMA latency x (in-flight + 1) wins."""

    def _score(self, stats: EndpointStats, now: float) -> float:
        return stats.cost(now)


_POLICIES: dict[str, PickerFactory] = {
    "pick_first": PickFirst,
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwma,
}


def register_policy(name: str, factory: PickerFactory) -> None:
    """Make a user policy available as ``ChannelConfig(policy=name)``."""
    _POLICIES[name] = factory


def available_policies() -> tuple[str, ...]:
    """Names accepted by ``ChannelConfig.policy``."""
    return tuple(sorted(_POLICIES))


def build_picker(policy: str, endpoints: Sequence[EndpointStats], ctx: PickerContext, reason: str = "") -> Picker:
    """A picker of ``policy`` over ``endpoints`` (an error picker if empty)."""
    if not endpoints:
        return ErrorPicker(reason or "no endpoints")
    usable = tuple(endpoints)
    if len(usable) == 1 and policy in ("pick_first", "round_robin", "least_request", "peak_ewma"):
        return _Single(usable, ctx)
    return _POLICIES[policy](usable, ctx)
