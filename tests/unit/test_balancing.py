"""Pickers, outlier detection and the balancer core with a fake clock (no sockets)."""

from __future__ import annotations

import collections
import math
import random

import pytest

from rpcframe.balancing.balancer import BalancerCore, Connectivity
from rpcframe.balancing.endpoint import Endpoint, EndpointStats, Outcome
from rpcframe.balancing.outlier import OutlierConfig, update_ejections
from rpcframe.balancing.pickers import (
    NoEndpointError,
    PickerContext,
    available_policies,
    build_picker,
    register_policy,
)
from rpcframe.balancing.resolver import DNSResolver, ManualResolver, StaticResolver, resolver_for
from rpcframe.errors import ConfigError


class FakeClock:
    """Manually advanced monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _stats(clock: FakeClock, *addresses: str, weights: tuple[int, ...] = ()) -> list[EndpointStats]:
    ws = weights or (1,) * len(addresses)
    return [EndpointStats(Endpoint(a, weight=w), clock) for a, w in zip(addresses, ws, strict=True)]


def _ctx(clock: FakeClock, slow_start: float = 0.0) -> PickerContext:
    return PickerContext(clock=clock, slow_start=slow_start, rng=random.Random(7))


def _count(picker, n: int, latency: float = 0.01) -> collections.Counter[str]:  # type: ignore[no-untyped-def]
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        stats, done = picker.pick()
        counts[stats.address] += 1
        done(Outcome.SUCCESS, latency)
    return counts


def test_round_robin_is_even(clock: FakeClock) -> None:
    picker = build_picker("round_robin", _stats(clock, "a", "b", "c"), _ctx(clock))
    assert _count(picker, 300) == {"a": 100, "b": 100, "c": 100}


def test_pick_first_sticks_to_first(clock: FakeClock) -> None:
    picker = build_picker("pick_first", _stats(clock, "a", "b"), _ctx(clock))
    assert _count(picker, 10) == {"a": 10}


def test_weighted_round_robin_follows_weights_and_interleaves(clock: FakeClock) -> None:
    picker = build_picker("weighted_round_robin", _stats(clock, "a", "b", weights=(3, 1)), _ctx(clock))
    sequence = [picker.pick()[0].address for _ in range(8)]
    assert collections.Counter(sequence) == {"a": 6, "b": 2}
    assert "bb" not in "".join(sequence)  # smooth: no bursts of the light endpoint
    assert {s.address for s in picker.endpoints} == {"a", "b"}


def test_least_request_avoids_busy_endpoint(clock: FakeClock) -> None:
    stats = _stats(clock, "a", "b")
    for _ in range(5):
        stats[0].begin()  # a is busy
    picker = build_picker("least_request", stats, _ctx(clock))
    chosen, done = picker.pick()
    assert chosen.address == "b"
    done(Outcome.SUCCESS, 0.01)


def test_peak_ewma_prefers_fast_endpoint(clock: FakeClock) -> None:
    stats = _stats(clock, "fast", "slow")
    stats[0].begin()
    stats[0].done(Outcome.SUCCESS, 0.001)
    stats[1].begin()
    stats[1].done(Outcome.SUCCESS, 0.5)
    picker = build_picker("peak_ewma", stats, _ctx(clock))
    counts = _count(picker, 100, latency=0.001)
    assert counts["fast"] == 100  # with two endpoints P2C always compares both


def test_peak_ewma_peaks_then_decays(clock: FakeClock) -> None:
    (stats,) = _stats(clock, "a")
    stats.begin()
    stats.done(Outcome.SUCCESS, 0.010)
    stats.begin()
    stats.done(Outcome.SUCCESS, 0.300)  # a slow sample takes effect at once
    assert stats.ewma.current(clock()) == pytest.approx(0.300)
    clock.advance(10.0)  # one decay period later the estimate fell to 1/e
    assert stats.ewma.current(clock()) == pytest.approx(0.300 / math.e)
    stats.begin()
    stats.done(Outcome.SUCCESS, 0.010)
    # A faster sample blends in with weight 1 - 1/e after one decay period.
    assert stats.ewma.value == pytest.approx(0.300 / math.e + 0.010 * (1 - 1 / math.e))


def test_in_flight_age_raises_cost_before_first_answer(clock: FakeClock) -> None:
    fresh, steady = _stats(clock, "fresh", "steady")
    steady.begin()
    steady.done(Outcome.SUCCESS, 0.002)
    fresh.begin()  # a call to a backend that has not answered yet
    assert fresh.cost(clock()) == pytest.approx(0.001 * 2)  # unknown: DEFAULT_RTT x (1 + 1)
    clock.advance(0.5)
    assert fresh.cost(clock()) == pytest.approx(0.5 * 2)  # the outstanding call's age counts
    assert steady.cost(clock()) < fresh.cost(clock())
    fresh.done(Outcome.SUCCESS, 0.5)
    assert fresh.cost(clock()) == pytest.approx(0.5)


def test_streams_do_not_age(clock: FakeClock) -> None:
    (stats,) = _stats(clock, "a")
    stats.begin()
    stats.as_stream()
    clock.advance(100)
    assert stats.cost(clock()) == pytest.approx(0.001 * 2)  # long stream, no latency penalty
    stats.done(Outcome.IGNORED, -1.0)
    assert (stats.inflight, stats.streams) == (0, 0)


def test_done_tracks_inflight_and_failures(clock: FakeClock) -> None:
    (stats,) = _stats(clock, "a")
    picker = build_picker("peak_ewma", [stats], _ctx(clock))
    s, done = picker.pick()
    assert s.inflight == 1
    assert done(Outcome.FAILURE, 0.01) is False
    assert s.inflight == 0
    assert s.consecutive_failures == 1
    picker.pick()[1](Outcome.IGNORED, 0.0)
    assert s.consecutive_failures == 1  # cancellations say nothing about the endpoint
    picker.pick()[1](Outcome.SUCCESS, 0.01)
    assert s.consecutive_failures == 0


def test_failure_threshold_requests_rebuild(clock: FakeClock) -> None:
    stats = EndpointStats(Endpoint("a"), clock, failure_threshold=3)
    results = []
    for _ in range(4):
        stats.begin()
        results.append(stats.done(Outcome.FAILURE, 0.01))
    assert results == [False, False, True, False]


def test_slow_start_ramps_new_endpoint(clock: FakeClock) -> None:
    old, new = _stats(clock, "old", "new")
    new.ready_since = clock()
    picker = build_picker("round_robin", [old, new], _ctx(clock, slow_start=10.0))
    early = _count(picker, 1000)
    assert early["new"] < 200  # ~10% at the start of the ramp
    clock.advance(10.0)
    assert _count(picker, 1000)["new"] == 500


def test_slow_start_in_p2c(clock: FakeClock) -> None:
    old, new = _stats(clock, "old", "new")
    new.ready_since = clock()
    picker = build_picker("least_request", [old, new], _ctx(clock, slow_start=10.0))
    old.begin()  # old has one call in flight, new none: new would win without slow start
    chosen, done = picker.pick()
    assert chosen.address == "old"
    done(Outcome.SUCCESS, 0.01)


def test_empty_picker_raises_with_reason(clock: FakeClock) -> None:
    picker = build_picker("peak_ewma", [], _ctx(clock), "svc: no ready endpoint")
    with pytest.raises(NoEndpointError, match="svc: no ready endpoint"):
        picker.pick()


def test_register_policy(clock: FakeClock) -> None:
    class Last:
        def __init__(self, endpoints, ctx):  # type: ignore[no-untyped-def]
            self.endpoints = endpoints

        def pick(self):  # type: ignore[no-untyped-def]
            last = self.endpoints[-1]
            last.begin()
            return last, last.done

    register_policy("last", Last)
    assert "last" in available_policies()
    assert _count(build_picker("last", _stats(clock, "a", "b"), _ctx(clock)), 5) == {"b": 5}


# -- outlier detection -------------------------------------------------------


def _fail(stats: EndpointStats, times: int) -> None:
    for _ in range(times):
        stats.begin()
        stats.done(Outcome.FAILURE, 0.01)


def test_ejection_grows_and_is_capped(clock: FakeClock) -> None:
    config = OutlierConfig(consecutive_failures=2, base_ejection_time=10, max_ejection_time=25)
    a, b, c, d = _stats(clock, "a", "b", "c", "d")
    durations = []
    for _ in range(4):
        _fail(a, 2)
        update_ejections([a, b, c, d], config, clock())
        durations.append(a.ejected_until - clock())
        clock.now = a.ejected_until
    assert durations == [10, 20, 25, 25]


def test_at_most_max_percent_ejected(clock: FakeClock) -> None:
    config = OutlierConfig(consecutive_failures=1, max_ejection_percent=50)
    endpoints = _stats(clock, "a", "b", "c", "d")
    for s in endpoints:
        _fail(s, 1)
    next_expiry = update_ejections(endpoints, config, clock())
    assert sum(s.ejected_until > clock() for s in endpoints) == 2
    assert next_expiry == clock() + config.base_ejection_time


def test_outlier_config_validation() -> None:
    with pytest.raises(ConfigError):
        OutlierConfig(consecutive_failures=0)
    with pytest.raises(ConfigError):
        OutlierConfig(base_ejection_time=10, max_ejection_time=5)


# -- balancer core -------------------------------------------------------------


def _core(clock: FakeClock, policy: str = "round_robin", **kwargs: object) -> BalancerCore:
    return BalancerCore("svc", policy, _ctx(clock), **kwargs)  # type: ignore[arg-type]


def _ready(core: BalancerCore, *addresses: str) -> None:
    core.set_endpoints([Endpoint(a) for a in addresses])
    for a in addresses:
        core.set_connectivity(a, Connectivity.READY)


def test_core_only_ready_endpoints_are_picked(clock: FakeClock) -> None:
    core = _core(clock)
    with pytest.raises(NoEndpointError, match="svc: resolving"):
        core.current().pick()
    core.set_endpoints([Endpoint("a"), Endpoint("b")])
    # Nothing ready yet: calls go to connecting endpoints for grpc to queue.
    assert (core.fallback, core.all_failed) == (True, False)
    assert "a IDLE; b IDLE" in core.reason
    assert set(_count(core.current(), 4)) == {"a", "b"}
    core.set_connectivity("a", Connectivity.TRANSIENT_FAILURE)
    core.set_connectivity("b", Connectivity.READY)
    assert not core.fallback
    assert _count(core.current(), 4) == {"b": 4}
    core.set_connectivity("b", Connectivity.TRANSIENT_FAILURE)
    assert (core.fallback, core.all_failed) == (True, True)
    assert "a TRANSIENT_FAILURE; b TRANSIENT_FAILURE" in core.reason


def test_core_health_takes_endpoint_out_and_back(clock: FakeClock) -> None:
    core = _core(clock, panic_threshold=0.0)
    _ready(core, "a", "b", "c")
    core.set_serving("b", False, "NOT_SERVING")
    assert set(_count(core.current(), 30)) == {"a", "c"}
    core.set_serving("b", True)
    assert set(_count(core.current(), 30)) == {"a", "b", "c"}


def test_core_panic_spreads_over_all_connected(clock: FakeClock) -> None:
    core = _core(clock, panic_threshold=0.5)
    _ready(core, "a", "b", "c")
    core.set_serving("a", False)
    core.set_serving("b", False)
    assert core.panic
    assert set(_count(core.current(), 30)) == {"a", "b", "c"}


def test_core_ejects_and_readmits(clock: FakeClock) -> None:
    outlier = OutlierConfig(consecutive_failures=3, base_ejection_time=5)
    core = _core(clock, outlier=outlier, panic_threshold=0.0)
    _ready(core, "a", "b")
    a = next(e.stats for e in core.entries() if e.stats.address == "a")
    for _ in range(3):
        a.begin()
        if a.done(Outcome.FAILURE, 0.01):
            core.refresh()
    assert _count(core.current(), 10) == {"b": 10}
    clock.advance(5)
    assert set(_count(core.current(), 10)) == {"a", "b"}  # re-admitted on expiry


def test_core_resolver_update_keeps_stats_and_order(clock: FakeClock) -> None:
    core = _core(clock, policy="pick_first")
    _ready(core, "a", "b")
    a_stats = core.entries()[0].stats
    added, removed = core.set_endpoints([Endpoint("b"), Endpoint("a", weight=5), Endpoint("c")])
    assert [e.stats.address for e in added] == ["c"]
    assert removed == []
    assert [e.stats.address for e in core.entries()] == ["b", "a", "c"]
    assert core.entries()[1].stats is a_stats
    assert a_stats.endpoint.weight == 5
    assert _count(core.current(), 3) == {"b": 3}
    _, removed = core.set_endpoints([Endpoint("c")])
    assert sorted(e.stats.address for e in removed) == ["a", "b"]


def test_core_slow_start_only_for_late_joiners(clock: FakeClock) -> None:
    core = _core(clock)
    _ready(core, "a")
    first = core.entries()[0].stats
    assert first.ready_since == -math.inf
    core.set_endpoints([Endpoint("a"), Endpoint("b")])
    core.set_connectivity("b", Connectivity.READY)
    assert core.entries()[1].stats.ready_since == clock()


def test_core_listeners_run_on_rebuild(clock: FakeClock) -> None:
    core = _core(clock)
    calls = []
    core.add_listener(lambda: calls.append(1))
    _ready(core, "a")
    assert len(calls) == 2


# -- resolvers ---------------------------------------------------------------


def test_resolver_for_targets() -> None:
    static = resolver_for("127.0.0.1:1, 127.0.0.1:2")
    assert isinstance(static, StaticResolver)
    assert [e.address for e in static.endpoints] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert isinstance(resolver_for("static:///a:1"), StaticResolver)
    assert isinstance(resolver_for(["a:1", "b:2"]), StaticResolver)
    dns = resolver_for("dns:///localhost:50051", dns_refresh=5)
    assert isinstance(dns, DNSResolver)
    assert (dns.host, dns.port, dns.refresh) == ("localhost", 50051, 5)
    manual = ManualResolver()
    assert resolver_for(manual) is manual
    with pytest.raises(ConfigError, match="unknown target scheme"):
        resolver_for("xds:///svc")
    with pytest.raises(ConfigError, match="expected host:port"):
        resolver_for("dns:///nohost")


def test_manual_resolver_pushes_updates() -> None:
    seen: list[list[str]] = []
    resolver = ManualResolver(["a:1"])
    resolver.start(lambda eps: seen.append([e.address for e in eps]))
    resolver.update(["a:1", "b:2"])
    resolver.close()
    resolver.update(["c:3"])
    assert seen == [["a:1"], ["a:1", "b:2"]]


def test_dns_resolver_resolves_localhost() -> None:
    resolver = DNSResolver("localhost", 4242, refresh=60)
    addresses = {e.address for e in resolver.lookup()}
    assert addresses & {"127.0.0.1:4242", "[::1]:4242"}
