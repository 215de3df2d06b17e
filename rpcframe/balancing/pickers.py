"""Pickers: immutable snapshots that choose an endpoint per call.

A picker never blocks and does no I/O. The balancer builds a new one from the
usable endpoints whenever an endpoint's state changes; the endpoints' live
statistics (:class:`EndpointStats`) are shared between snapshots.

``pick()`` counts the call as started and returns ``(stats, done)``; the
caller must call ``done(outcome, latency_seconds)`` exactly once.

Policies (``ChannelConfig.policy``): ``pick_first``, ``round_robin``,
``least_request`` (power of two choices on in-flight calls), ``peak_ewma``
(power of two choices on peak-EWMA latency x (in-flight + 1)),
``filtered_p2c`` (the default: the same choice among the endpoints that are
not latency outliers, see :class:`FilteredP2C`) and ``weighted_round_robin``
(weights from resolver metadata). User policies are added with
:func:`register_policy`.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .endpoint import DEFAULT_RTT, EndpointStats, Outcome

__all__ = [
    "NoEndpointError",
    "Pick",
    "Picker",
    "PickerContext",
    "available_policies",
    "build_picker",
    "register_policy",
    "uses_peak_ewma",
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


class FilteredP2C:
    """Power of two choices on latency x (in-flight + 1), among the endpoints that are not latency outliers.

    P2C alone picks a slow endpoint whenever both random choices are slow:
    with k slow endpoints of n, about (k/n)^2 of calls, the whole tail when
    several are slow. Here the two candidates come from a filtered set,
    rebuilt every REFRESH seconds in O(n) (no per-pick scan). An endpoint is
    left out when its effective latency (mean latency, or the mean age of
    its calls in flight when longer, so a backend that turns slow is seen
    before its first slow answer) exceeds the fastest endpoint's mean by
    more than OUTLIER_FACTOR x the lower quartile's excess (and more than
    MIN_EXCESS x the fastest's own latency), plus OUTLIER_SLACK.

    - Excesses, not ratios: a busy client's own queueing adds the same to
      every endpoint's latency and would make a 50x slower backend look 3x
      slower.
    - The lower quartile (the second endpoint of 2-7) is the reference, so a
      quarter of the fleet always qualifies and several slow endpoints
      cannot drag it up as they drag a mean or a median.
    - Within the set, P2C on latency x (in-flight + 1) spreads load by
      in-flight counts, as peak_ewma does: no herding onto the fastest.

    An endpoint clearly slow (SLOW_FACTOR x the limit's excess) stays out
    until it answers again: a stall of the client itself inflates every
    busy endpoint's latency, and must not readmit idle slow endpoints on
    their stale means. The left-out are probed with one real call at a time:
    at most one probe per PROBE_EVERY picks (or PROBE_GAP seconds), so that
    probes stay a small share of the tail, to the endpoint without a call
    for PROBE_IDLE seconds whose mean, decayed toward the fastest's over
    DECAY seconds, is lowest; one just over the limit (load, a stall) is
    probed, unrationed, as soon as that decayed mean is within the limit.
    A probe's answer replaces the stale mean (:meth:`EndpointStats.done`),
    so a recovered endpoint rejoins at once. An endpoint that has never
    answered (cold start, a new one) gets one call at a time until it has;
    while none has answered, P2C on in-flight counts spreads calls.
    """

    #: Seconds between rebuilds of the candidate set.
    REFRESH = 0.01
    #: An endpoint whose latency exceeds the fastest one's by more than this many times the lower quartile's
    #: excess...
    OUTLIER_FACTOR = 4.0
    #: ...(but at least this many times the fastest's own latency)...
    MIN_EXCESS = 1.5
    #: ...plus this many seconds (so that jitter excludes nothing) is left out.
    OUTLIER_SLACK = 0.003
    #: An endpoint whose excess is this many times the limit's is clearly slow: it stays out until it answers again.
    SLOW_FACTOR = 4.0
    #: Seconds over which the mean of one just over the limit decays toward the fastest's while it has no calls
    #: (it is probed once that is within the limit).
    DECAY = 1.0
    #: Seconds without a call before a left-out endpoint is probed...
    PROBE_IDLE = 2.0
    #: ...and picks between two probes (a probe of a still-slow endpoint is a slow call: this keeps them
    #: under 0.02 % of calls, a fifth of the p99.9 budget)...
    PROBE_EVERY = 5000
    #: ...or seconds, whichever comes first.
    PROBE_GAP = 5.0

    def __init__(self, endpoints: tuple[EndpointStats, ...], ctx: PickerContext) -> None:
        self.endpoints = endpoints
        self._random = ctx.rng.random
        self._clock = ctx.clock
        self._slow_start = ctx.slow_start
        self._warm_until = _warm_until(endpoints, ctx)
        self._picks = itertools.count().__next__  # atomic in CPython
        self._probe_pick = 0
        self._probe_at = ctx.clock()
        self._refreshing = threading.Lock()
        self._next_refresh = -math.inf
        self._candidates = endpoints
        self._unknown = DEFAULT_RTT  # what an endpoint that has not answered is assumed to take
        self._probes: list[EndpointStats] = []

    def pick(self) -> Pick:
        self._picks()
        now = self._clock()
        if now >= self._next_refresh and self._refreshing.acquire(blocking=False):
            try:
                self._refresh(now)
            finally:
                self._refreshing.release()
        if self._probes:
            try:
                probe = self._probes.pop()  # atomic: two callers never take the same probe
            except IndexError:
                pass
            else:
                probe.begin()
                return probe, probe.done
        candidates = self._candidates
        n = len(candidates)
        if n == 1:
            chosen = candidates[0]
        else:
            rand = self._random
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            if j >= i:
                j += 1
            a, b = candidates[i], candidates[j]
            unknown = self._unknown
            cost_a = a.effective_latency(now, unknown) * (a.inflight + 1)
            cost_b = b.effective_latency(now, unknown) * (b.inflight + 1)
            if now < self._warm_until:
                cost_a /= a.warmth(now, self._slow_start)
                cost_b /= b.warmth(now, self._slow_start)
            chosen = a if cost_a <= cost_b else b
        chosen.begin(now)  # this pick's clock reading: no second one
        return chosen, chosen.done

    def _refresh(self, now: float) -> None:
        """Rebuild the candidate set and the probes due."""
        self._next_refresh = now + self.REFRESH
        known: list[EndpointStats] = []
        probes = []
        for stats in self.endpoints:
            if stats.latency > 0:
                known.append(stats)
            elif stats.inflight == 0:
                probes.append(stats)  # never answered: one call at a time until it has
        if not known:
            # Cold start: spread by in-flight counts, and look again at the
            # next pick, so the first answer ends this blind phase at once.
            self._candidates, self._probes = self.endpoints, []
            self._next_refresh = now
            return
        ordered = sorted(stats.latency for stats in known)
        fastest = ordered[0]
        limit, slow = self._limits(ordered)
        candidates = []
        probe: EndpointStats | None = None  # the left-out endpoint most likely back to normal
        for stats in known:
            if stats.left_out_at != math.inf:
                if stats.latency_at <= stats.left_out_at:
                    probe = self._likelier(probe, stats, fastest, now)
                    continue  # slow when left out, and no answer since
                stats.left_out_at = math.inf
            if stats.latency > slow:
                # Clearly slow: out until it answers again (a probe, or a call
                # that was in flight), not back on a stale mean because a
                # stall of the client itself raised everyone else's.
                stats.left_out_at = now
                probe = self._likelier(probe, stats, fastest, now)
            elif stats.effective_latency(now, 0.0) <= limit:
                candidates.append(stats)
            elif self._decayed(stats, fastest, now) <= limit:
                probes.append(stats)  # just over the limit a while ago: one call to see (not rationed)
            else:
                probe = self._likelier(probe, stats, fastest, now)
        if not candidates:
            candidates = [min(known, key=lambda stats: stats.latency)]
        if probe is not None and self._probe_due(now):
            probes.append(probe)
        self._candidates, self._probes = tuple(candidates), probes

    def _decayed(self, stats: EndpointStats, fastest: float, now: float) -> float:
        """The mean of an endpoint without calls, decayed toward the fastest's since its last answer.

        One left out just over the limit (a burst of load, a stall) is
        probed once this is within the limit: within a second or two, sooner
        than the rationed probes of the clearly slow.
        """
        if stats.inflight:
            return math.inf
        return fastest + (stats.latency - fastest) * math.exp((stats.latency_at - now) / self.DECAY)

    def _limits(self, ordered: list[float]) -> tuple[float, float]:
        """(outlier limit, clearly-slow limit) from the sorted mean latencies of the endpoints that answered."""
        fastest, reference = ordered[0], ordered[max(1, len(ordered) // 4) if len(ordered) > 1 else 0]
        self._unknown = reference
        # Measured from the fastest: what every call shares (the client's own
        # queueing when it is busy, the network) is no sign of a slow backend;
        # and MIN_EXCESS x the fastest never is (in a fleet of equals the
        # spread is load: queueing must not evict them one by one onto the
        # rest, nor a somewhat slower one's capacity be thrown away).
        spread = (reference - fastest) * self.OUTLIER_FACTOR
        floor = fastest * self.MIN_EXCESS
        excess = (spread if spread > floor else floor) + self.OUTLIER_SLACK
        return fastest + excess, fastest + self.SLOW_FACTOR * excess

    def _likelier(
        self, best: EndpointStats | None, stats: EndpointStats, fastest: float, now: float
    ) -> EndpointStats | None:
        """Of two endpoints left out, the one to probe first: idle PROBE_IDLE, the lowest decayed mean."""
        if stats.inflight or now - stats.last_begin < self.PROBE_IDLE:
            return best
        if best is None or self._decayed(stats, fastest, now) < self._decayed(best, fastest, now):
            return stats
        return best

    def _probe_due(self, now: float) -> bool:
        picks = self._picks()
        if picks - self._probe_pick < self.PROBE_EVERY and now - self._probe_at < self.PROBE_GAP:
            return False
        self._probe_pick, self._probe_at = picks, now
        return True


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
    "filtered_p2c": FilteredP2C,
}
_BUILT_IN = dict(_POLICIES)  # a built-in name re-registered by a user is a user policy


def register_policy(name: str, factory: PickerFactory) -> None:
    """Make a user policy available as ``ChannelConfig(policy=name)``."""
    _POLICIES[name] = factory


#: Built-in policies that never read an endpoint's peak-EWMA (:meth:`EndpointStats.cost`): their
#: endpoints skip updating it on every call. User policies may read it, so they keep it.
_WITHOUT_PEAK_EWMA = frozenset({"pick_first", "round_robin", "weighted_round_robin", "least_request", "filtered_p2c"})


def uses_peak_ewma(policy: str) -> bool:
    """Whether ``policy``'s pickers may read the endpoints' peak-EWMA latency."""
    return policy not in _WITHOUT_PEAK_EWMA or _POLICIES.get(policy) is not _BUILT_IN.get(policy)


def available_policies() -> tuple[str, ...]:
    """Names accepted by ``ChannelConfig.policy``."""
    return tuple(sorted(_POLICIES))


def build_picker(policy: str, endpoints: Sequence[EndpointStats], ctx: PickerContext, reason: str = "") -> Picker:
    """A picker of ``policy`` over ``endpoints`` (an error picker if empty)."""
    if not endpoints:
        return ErrorPicker(reason or "no endpoints")
    usable = tuple(endpoints)
    if len(usable) == 1 and policy in ("pick_first", "round_robin", "least_request", "peak_ewma", "filtered_p2c"):
        return _Single(usable, ctx)
    return _POLICIES[policy](usable, ctx)
