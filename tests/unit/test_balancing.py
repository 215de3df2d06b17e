"""Pickers, outlier detection and the balancer core with a fake clock (no sockets)."""

from __future__ import annotations

import collections
import heapq
import math
import random

import pytest

from rpcframe.balancing.balancer import BalancerCore, Connectivity
from rpcframe.balancing.endpoint import Endpoint, EndpointStats, Outcome
from rpcframe.balancing.outlier import OutlierConfig, update_ejections
from rpcframe.balancing.pickers import (
    FilteredP2C,
    NoEndpointError,
    PickerContext,
    available_policies,
    build_picker,
    register_policy,
)
from rpcframe.balancing.resolver import DNSResolver, ManualResolver, StaticResolver, resolver_for
from rpcframe.config import ChannelConfig
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


def test_core_draining_endpoint_is_out_until_its_connection_changes(clock: FakeClock) -> None:
    core = _core(clock, panic_threshold=0.0)
    _ready(core, "a", "b")
    a = next(e.stats for e in core.entries() if e.stats.address == "a")
    core.set_draining(a)
    assert set(_count(core.current(), 20)) == {"b"}
    assert [e.state(clock()) for e in core.entries()] == ["DRAINING", "READY"]
    assert "a draining" in core.entries()[0].describe(clock())
    core.set_serving("a", True)  # a late SERVING (health said so before the drain) does not bring it back
    assert set(_count(core.current(), 20)) == {"b"}
    core.set_connectivity("a", Connectivity.IDLE)  # the server's GOAWAY
    core.set_connectivity("a", Connectivity.READY)  # connected to whatever serves there now
    assert set(_count(core.current(), 20)) == {"a", "b"}


def test_core_panic_and_fallback_leave_a_draining_endpoint_out(clock: FakeClock) -> None:
    core = _core(clock, panic_threshold=0.5)
    _ready(core, "a", "b")
    a = next(e.stats for e in core.entries() if e.stats.address == "a")
    core.set_draining(a)
    core.set_serving("b", False, "NOT_SERVING")  # panic: spread over connected endpoints, but not "a"
    assert core.panic
    assert set(_count(core.current(), 20)) == {"b"}
    core.set_connectivity("b", Connectivity.TRANSIENT_FAILURE)  # fallback: nothing ready
    assert core.fallback
    assert set(_count(core.current(), 20)) == {"b"}
    core.set_endpoints([Endpoint("a")])
    with pytest.raises(NoEndpointError, match="a draining"):
        core.current().pick()


def test_core_draining_report_from_a_replaced_entry_is_ignored(clock: FakeClock) -> None:
    core = _core(clock, panic_threshold=0.0)
    _ready(core, "a", "b")
    old = next(e.stats for e in core.entries() if e.stats.address == "a")
    core.set_endpoints([Endpoint("b")])
    core.set_endpoints([Endpoint("a"), Endpoint("b")])  # "a" again: a new entry, new stats
    core.set_connectivity("a", Connectivity.READY)
    core.set_draining(old)  # a refusal seen on the old connection
    assert set(_count(core.current(), 20)) == {"a", "b"}


def test_core_renewed_entry_waits_for_its_first_serving_when_asked(clock: FakeClock) -> None:
    core = _core(clock, panic_threshold=0.0)
    _ready(core, "a", "b")
    core.set_serving("a", False, "NOT_SERVING")
    old = core.renew("a", lambda entry: None, serving=False)
    assert old is not None
    assert old.stats.address == "a"
    core.set_connectivity("a", Connectivity.READY)  # the replacement connected: not picked yet
    assert set(_count(core.current(), 20)) == {"b"}
    assert {e.stats.address: e.state(clock()) for e in core.entries()}["a"] == "NOT_SERVING"
    core.set_serving("a", True, "SERVING")
    assert set(_count(core.current(), 40)) == {"a", "b"}
    core.renew("b", lambda entry: None)  # the default: picked once connected, as before
    core.set_connectivity("b", Connectivity.READY)
    assert "b" in set(_count(core.current(), 40))


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


# -- filtered_p2c (the default policy) ------------------------------------------


def _simulate(  # type: ignore[no-untyped-def]
    clock: FakeClock, picker, service, calls: int, in_flight: int = 50, capacity: int = 0
) -> tuple[collections.Counter[str], dict[str, float]]:
    """A closed loop of ``in_flight`` callers over ``picker`` on the fake clock (discrete events).

    ``service(address, now)`` draws a call's service time; with ``capacity``
    each endpoint serves that many calls at once and queues the rest (FIFO).
    Returns the calls started per endpoint and each endpoint's time-averaged
    in-flight count.
    """
    rng = random.Random(3)
    events: list[tuple[float, int, str, object, float]] = []
    busy: collections.Counter[str] = collections.Counter()
    queues: dict[str, collections.deque[tuple[object, float]]] = collections.defaultdict(collections.deque)
    counts: collections.Counter[str] = collections.Counter()
    area: collections.Counter[str] = collections.Counter()
    started_at, seq, last = clock(), 0, clock()

    def serve(address: str, done: object, begun: float) -> None:
        nonlocal seq
        busy[address] += 1
        heapq.heappush(events, (clock() + service(address, clock(), rng), seq, address, done, begun))
        seq += 1

    def start() -> None:
        stats, done = picker.pick()
        counts[stats.address] += 1
        if capacity and busy[stats.address] >= capacity:
            queues[stats.address].append((done, clock()))
        else:
            serve(stats.address, done, clock())

    for _ in range(in_flight):
        start()
    for _ in range(calls - in_flight):
        finish, _, address, done, begun = heapq.heappop(events)
        for stats in picker.endpoints:
            area[stats.address] += stats.inflight * (finish - last)
        clock.now = last = finish
        busy[address] -= 1
        done(Outcome.SUCCESS, finish - begun)  # type: ignore[operator]
        if queues[address]:
            serve(address, *queues[address].popleft())
        start()
    elapsed = clock() - started_at
    return counts, {a: v / elapsed for a, v in area.items()}


def _fleet(clock: FakeClock, n: int = 10) -> list[EndpointStats]:
    return _stats(clock, *(f"b{i}" for i in range(n)))


def test_filtered_p2c_keeps_several_slow_endpoints_out(clock: FakeClock) -> None:
    stats = _fleet(clock)
    slow = {"b0", "b1", "b2"}  # 3 of 10 degraded 50x: P2C's ceiling is (3/10)^2 = 9 % of calls on them

    def service(address: str, now: float, rng: random.Random) -> float:
        return rng.uniform(0, 0.5 if address in slow else 0.01)

    counts, _ = _simulate(clock, build_picker("filtered_p2c", stats, _ctx(clock)), service, 20000)
    on_slow = sum(counts[a] for a in slow)
    assert on_slow <= 40  # cold start (50 blind calls) and a few probes: < 0.2 %
    assert min(counts[f"b{i}"] for i in range(3, 10)) > 1500  # the fast ones share the rest
    peak = _simulate(clock, build_picker("peak_ewma", _fleet(clock), _ctx(clock)), service, 20000)[0]
    assert sum(peak[a] for a in slow) > 10 * on_slow  # what this policy is for


def test_filtered_p2c_unknown_endpoint_gets_one_call_at_a_time(clock: FakeClock) -> None:
    known = _stats(clock, "a", "b")
    for stats in known:
        stats.begin()
        stats.done(Outcome.SUCCESS, 0.01)
    (new,) = _stats(clock, "new")
    picker = build_picker("filtered_p2c", [*known, new], _ctx(clock))
    first = [picker.pick() for _ in range(30)]  # none answers yet
    assert new.inflight == 1  # probed once, not given a third of the calls
    assert first[0][0] is new
    new_done = first[0][1]
    clock.advance(0.012)
    new_done(Outcome.SUCCESS, 0.012)
    for _, done in first[1:]:
        done(Outcome.SUCCESS, 0.012)
    clock.advance(FilteredP2C.REFRESH)
    held = collections.Counter(picker.pick()[0].address for _ in range(30))  # 30 calls in flight at once
    assert held["new"] >= 5  # answered like the others: a full member


def test_filtered_p2c_cold_start_spreads_until_first_answer(clock: FakeClock) -> None:
    stats = _fleet(clock, 5)
    picker = build_picker("filtered_p2c", stats, _ctx(clock))
    picks = [picker.pick() for _ in range(50)]
    assert all(8 <= s.inflight <= 12 for s in stats)  # nothing known: P2C on in-flight counts
    picks[0][1](Outcome.SUCCESS, 0.001)  # b-something answers: the blind phase ends at the next pick
    answered = picks[0][0]
    assert all(picker.pick()[0] is answered for _ in range(5))


def test_filtered_p2c_newly_slow_endpoint_left_out_before_its_first_answer(clock: FakeClock) -> None:
    stats = _fleet(clock, 4)
    picker = build_picker("filtered_p2c", stats, _ctx(clock))
    _count(picker, 400, latency=0.005)  # everyone known at 5 ms
    stuck = [stats[0].begin() for _ in range(2)]  # two calls to b0 that do not come back
    assert len(stuck) == 2
    clock.advance(0.1)  # 20x the fleet's latency, and still no answer from b0
    counts = _count(picker, 400, latency=0.005)
    assert counts["b0"] == 0


def test_filtered_p2c_probes_a_left_out_endpoint_and_takes_it_back(clock: FakeClock) -> None:
    stats = _fleet(clock, 4)
    for s in stats:
        s.begin()
        s.done(Outcome.SUCCESS, 0.5 if s.address == "b0" else 0.005)
    picker = build_picker("filtered_p2c", stats, _ctx(clock))
    assert _count(picker, FilteredP2C.PROBE_EVERY, latency=0.005)["b0"] == 0
    clock.advance(FilteredP2C.PROBE_IDLE)  # idle long enough, and PROBE_EVERY picks have passed
    probes = [picker.pick() for _ in range(20)]
    assert sum(s is stats[0] for s, _ in probes) == 1  # one probe, one call at a time
    for _, done in probes:
        done(Outcome.SUCCESS, 0.005)  # b0 has recovered: the probe replaces its stale mean
    assert stats[0].latency == pytest.approx(0.005)
    clock.advance(FilteredP2C.REFRESH)
    held = collections.Counter(picker.pick()[0].address for _ in range(40))  # 40 calls in flight at once
    assert held["b0"] >= 6  # back to a share


def test_filtered_p2c_client_stall_does_not_readmit_slow_endpoints(clock: FakeClock) -> None:
    stats = _fleet(clock, 4)
    for s in stats:
        s.begin()
        s.done(Outcome.SUCCESS, 0.2 if s.address == "b0" else 0.005)
    picker = build_picker("filtered_p2c", stats, _ctx(clock))
    held = [picker.pick() for _ in range(9)]  # b1..b3 busy, b0 left out
    assert all(s is not stats[0] for s, _ in held)
    clock.advance(0.3)  # the client stalls: every call in flight now looks 300 ms old, b0's mean is 200 ms
    assert all(picker.pick()[0] is not stats[0] for _ in range(30))


def test_filtered_p2c_endpoint_just_over_the_limit_is_probed_early(clock: FakeClock) -> None:
    stats = _fleet(clock, 4)
    for s in stats:
        s.begin()
        s.done(Outcome.SUCCESS, 0.02 if s.address == "b0" else 0.005)  # b0 4x: over the limit, not clearly slow
    picker = build_picker("filtered_p2c", stats, _ctx(clock))
    held = [picker.pick() for _ in range(12)]
    assert all(s is not stats[0] for s, _ in held)
    for _, done in held:
        done(Outcome.SUCCESS, 0.005)
    clock.advance(1.5)  # before a rationed probe (PROBE_IDLE): its mean has decayed toward the fastest's
    probe, done = picker.pick()
    assert probe is stats[0]
    done(Outcome.SUCCESS, 0.005)  # fast again: the answer replaces most of its stale mean
    clock.advance(FilteredP2C.REFRESH)
    assert sum(picker.pick()[0] is stats[0] for _ in range(12)) >= 2


def test_filtered_p2c_probes_are_rationed(clock: FakeClock) -> None:
    stats = _fleet(clock, 4)
    for s in stats:
        s.begin()
        s.done(Outcome.SUCCESS, 0.5 if s.address == "b0" else 0.005)
    picker = build_picker("filtered_p2c", stats, _ctx(clock))
    probes = 0
    for _ in range(200):  # 20 s at 100 picks/s: light traffic, so probes wait PROBE_GAP
        for _ in range(10):
            chosen, done = picker.pick()
            probes += chosen is stats[0]
            done(Outcome.SUCCESS, 0.5 if chosen is stats[0] else 0.005)
        clock.advance(0.1)
    assert 2 <= probes <= 20 / FilteredP2C.PROBE_GAP + 1


def test_filtered_p2c_does_not_herd_on_capacity_limited_backends(clock: FakeClock) -> None:
    def service(address: str, now: float, rng: random.Random) -> float:
        return 0.06 if address == "b0" else 0.02  # b0 3x slower per call

    def run(policy: str) -> tuple[float, dict[str, float]]:
        start = clock()
        picker = build_picker(policy, _fleet(clock), _ctx(clock))
        _, in_flight = _simulate(clock, picker, service, 20000, capacity=4)
        return 20000 / (clock() - start), in_flight

    throughput, in_flight = run("filtered_p2c")
    assert max(in_flight.values()) < 1.5 * 50 / 10  # nobody holds more than 1.5x its fair share
    assert throughput >= 0.95 * run("least_request")[0]


def test_latency_mean_weighs_samples_by_staleness(clock: FakeClock) -> None:
    (stats,) = _stats(clock, "a")
    stats.begin()
    stats.done(Outcome.SUCCESS, 0.010)
    assert stats.latency == pytest.approx(0.010)  # the first sample is the mean
    stats.begin()
    stats.done(Outcome.SUCCESS, 0.110)
    assert stats.latency == pytest.approx(0.020)  # busy: a sample weighs LATENCY_WEIGHT (0.1)
    clock.advance(10)
    stats.begin()
    stats.done(Outcome.SUCCESS, 0.001)
    assert stats.latency == pytest.approx(0.001)  # after a long gap the mean was stale: replaced


def test_default_policy_is_filtered_p2c() -> None:
    assert ChannelConfig().policy == "filtered_p2c"
    assert {"round_robin", "least_request", "peak_ewma", "filtered_p2c"} <= set(available_policies())


def test_only_policies_that_read_it_keep_the_peak_ewma() -> None:
    from rpcframe.balancing.pickers import register_policy, uses_peak_ewma

    assert uses_peak_ewma("peak_ewma")
    assert not uses_peak_ewma("filtered_p2c")
    assert not uses_peak_ewma("round_robin")
    register_policy("test-own-ewma-reader", lambda endpoints, ctx: build_picker("peak_ewma", endpoints, ctx))
    assert uses_peak_ewma("test-own-ewma-reader")  # a user policy may call cost()
    stats = EndpointStats(Endpoint("a:1"), lambda: 0.0)
    stats.peak_ewma = False
    stats.begin()
    stats.done(Outcome.SUCCESS, 0.5)
    assert stats.ewma.value == 0.0  # not kept
    assert stats.latency > 0.0  # the mean filtered_p2c reads still is
