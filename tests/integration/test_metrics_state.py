"""Metrics beyond call events: A96 retry delay, A66 server sizes, and rpcframe's own state.

Endpoint state, in-flight calls, ejections, budget refusals and auth denials
are read from real channels and servers when the metrics are collected
(OpenTelemetry's in-memory reader; Prometheus's text exposition).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.observe import EndpointState, StateReader
from rpcframe.prometheus import PrometheusObserver
from rpcframe.security import ApiKeys, AuthConfig, StaticToken
from tests.conftest import wait_until
from tests.integration.test_otel import ECHO, Telemetry
from tests.servicers import Backend, ScriptedEcho


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    made = Telemetry()
    yield made
    made.tracer_provider.shutdown()
    made.meter_provider.shutdown()


def _by(points: list[Any], key: str) -> dict[Any, Any]:
    return {p.attributes[key]: p for p in points}


def test_server_records_message_sizes_and_in_flight_calls(otel: Telemetry) -> None:
    request = pb.EchoRequest(message="sizes")
    servicer = ScriptedEcho("s")
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1, observers=otel.observers))
    server.add(servicer)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(default_timeout=10)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            response = stub.Echo(request)
            blocked = stub.Echo.future(pb.EchoRequest(message="block"))
            assert servicer.started.wait(10)
            (running,) = otel.points("rpcframe.server.in_flight")
            servicer.release.set()
            blocked.result()
    finally:
        server.stop(0)
    assert running.value == 1
    assert [p.value for p in otel.points("rpcframe.server.in_flight")] == [0]
    received = _by(otel.points("grpc.server.call.rcvd_total_compressed_message_size"), "grpc.method")[ECHO]
    sent = _by(otel.points("grpc.server.call.sent_total_compressed_message_size"), "grpc.method")[ECHO]
    assert received.count == sent.count == 2
    assert received.sum == request.ByteSize() + pb.EchoRequest(message="block").ByteSize()
    assert sent.sum == response.ByteSize() + pb.EchoResponse(message="block").ByteSize()


def test_a_retried_call_records_its_retries_and_the_delay_between_attempts(otel: Telemetry) -> None:
    backends = [Backend(name) for name in "ab"]
    backends[0].servicer.failing = True
    config = rpcframe.ChannelConfig(policy="round_robin", slow_start=0, default_timeout=10, observers=otel.observers)
    try:
        with rpcframe.connect([b.address for b in backends], config) as channel:
            wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(4):  # round robin: some calls meet the failing backend first
                assert stub.Echo(pb.EchoRequest(message="whoami")).message == "b"
            retried = channel.counters()["retries"]
    finally:
        for backend in backends:
            backend.stop()
    (retries,) = otel.points("grpc.client.call.retries")
    (delay,) = otel.points("grpc.client.call.retry_delay")
    (duration,) = [p for p in otel.points("grpc.client.call.duration") if p.attributes["grpc.method"] == ECHO]
    assert retried >= 1
    assert retries.count == delay.count == retried  # one retry per retried call here
    assert 0 < delay.sum < duration.sum  # backoff waited, and only part of the calls' time


def test_endpoint_state_in_flight_and_ejections_are_reported(otel: Telemetry) -> None:
    backends = [Backend(name) for name in "ab"]
    backends[0].servicer.failing = True
    config = rpcframe.ChannelConfig(
        policy="round_robin", slow_start=0, default_timeout=10, observers=otel.observers,
        outlier=rpcframe.OutlierConfig(consecutive_failures=2, max_ejection_percent=50),
    )  # fmt: skip
    failing = backends[0].address
    try:
        with rpcframe.connect([b.address for b in backends], config) as channel:
            wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(8):  # the failing backend fails twice in a row: ejected
                stub.Echo(pb.EchoRequest(message="whoami"))
            states = [(p.attributes["grpc.target"], p.attributes["rpcframe.endpoint"], p.attributes["rpcframe.state"])
                      for p in otel.points("rpcframe.client.endpoint.state") if p.value == 1]  # fmt: skip
            ejections = _by(otel.points("rpcframe.client.endpoint.ejections"), "rpcframe.endpoint")
            in_flight = _by(otel.points("rpcframe.client.endpoint.in_flight"), "rpcframe.endpoint")
    finally:
        for backend in backends:
            backend.stop()
    target = channel.target
    assert sorted(states) == sorted([(target, failing, "EJECTED"), (target, backends[1].address, "READY")])
    assert ejections[failing].value == 1
    assert ejections[backends[1].address].value == 0
    assert {address: p.value for address, p in in_flight.items()} == {b.address: 0 for b in backends}


def test_budget_refusals_are_counted_per_target(otel: Telemetry) -> None:
    backend = Backend("a")
    backend.servicer.failing = True
    config = rpcframe.ChannelConfig(default_timeout=10, observers=otel.observers,
                                    retry_budget=rpcframe.BudgetConfig(ratio=0, min_per_second=0))  # fmt: skip
    try:
        with rpcframe.connect(backend.address, config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(3):
                with pytest.raises(rpcframe.Unavailable):
                    stub.Echo(pb.EchoRequest(message="whoami"))
    finally:
        backend.stop()
    (refusals,) = otel.points("rpcframe.client.budget_refusals")
    assert refusals.attributes == {"grpc.target": backend.address}
    assert refusals.value == 3


def _auth_server(observers: tuple[Any, ...]) -> tuple[rpcframe.Server, str]:
    auth = AuthConfig(api_keys=ApiKeys.from_plain({"ci-bot": "k-0123456789abcdef"}))
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1, auth=auth, observers=observers))
    server.add(ScriptedEcho("s"))
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    return server, address


def _refused_calls(address: str) -> None:
    """One call without credentials, two with a key the server does not know."""
    with rpcframe.connect(address, rpcframe.ChannelConfig(default_timeout=10)) as channel:
        with pytest.raises(rpcframe.Unauthenticated):
            channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="x"))
    token = StaticToken("k-wrong", scheme=None, key_name="x-api-key")
    with rpcframe.connect(address, rpcframe.ChannelConfig(default_timeout=10, token=token)) as channel:
        for _ in range(2):
            with pytest.raises(rpcframe.Unauthenticated):
                channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="x"))


def test_auth_denials_are_counted_by_reason(otel: Telemetry) -> None:
    server, address = _auth_server(otel.observers)
    try:
        _refused_calls(address)
    finally:
        server.stop(0)
    denials = {p.attributes["rpcframe.reason"]: p.value for p in otel.points("rpcframe.server.auth.denials")}
    assert denials == {"missing": 1, "invalid": 2}


def test_prometheus_exposes_the_same_state() -> None:
    registry = CollectorRegistry()
    observers = (PrometheusObserver(registry),)
    server, address = _auth_server(observers)
    try:
        _refused_calls(address)
        token = StaticToken("k-0123456789abcdef", scheme=None, key_name="x-api-key")
        config = rpcframe.ChannelConfig(default_timeout=10, token=token, observers=observers)
        with rpcframe.connect(address, config) as channel:
            channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="x"))
            # The call may run before the connectivity watcher has reported READY.
            wait_until(lambda: channel.endpoints() == [(address, "READY")])
            text = generate_latest(registry).decode()
    finally:
        server.stop(0)
    assert 'rpcframe_server_auth_denials_total{rpcframe_reason="missing"} 1.0' in text
    assert 'rpcframe_server_auth_denials_total{rpcframe_reason="invalid"} 2.0' in text
    endpoint = f'grpc_target="{address}",rpcframe_endpoint="{address}"'
    assert f'rpcframe_client_endpoint_state{{{endpoint},rpcframe_state="READY"}} 1.0' in text
    assert f'rpcframe_client_endpoint_in_flight{{{endpoint}}} 0.0' in text
    assert "rpcframe_server_in_flight 0.0" in text
    size = pb.EchoRequest(message="x").ByteSize()
    assert (f'grpc_server_call_rcvd_total_compressed_message_size_bytes_sum{{grpc_method="{ECHO}",'
            f'grpc_status="OK"}} {size:.1f}') in text  # fmt: skip


class _Channel:
    """The part of a channel a StateReader reads (pure unit test of the folding)."""

    def __init__(self, target: str) -> None:
        self.target, self.closed, self.retries = target, False, 0

    def counters(self) -> dict[str, int]:
        return {"retries": self.retries}

    def endpoint_states(self) -> list[EndpointState]:
        return [EndpointState("h:1", "READY", 0, 0)]


def test_counters_stay_monotonic_when_channels_close_or_vanish() -> None:
    reader = StateReader()
    closed, dropped, kept = _Channel("t"), _Channel("t"), _Channel("t")
    for channel in (closed, dropped, kept):
        reader.add_channel(channel)
    closed.retries, dropped.retries, kept.retries = 1, 2, 4
    assert reader.client_counters() == {("t", "retries"): 7}
    closed.closed, closed.retries = True, 3  # its last increments happened before the close
    del dropped  # collected: its totals as last read
    assert reader.client_counters() == {("t", "retries"): 9}
    assert [target for target, _ in reader.endpoints()] == ["t"]  # only the open channel's endpoints
