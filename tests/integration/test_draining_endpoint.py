"""A server's refusal as shutting down takes its endpoint out of the client's picker at once.

Health-watching clients also learn of the drain from NOT_SERVING, but
later (and not at all without health checking). Until then every call
picked there was refused and failed over; a call refused in turn by a
draining server and by one shedding load could run out of failovers
(seen under CPU load in the SIGTERM reliability runs). These clients watch
no health, so only the refusal can take the endpoint out.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import eventually, run_in_thread, wait_until
from tests.servicers import ScriptedEcho

_CALLS = 20


class _Draining:
    """Server "a" draining (a call held in flight keeps it so) beside server "b"."""

    def __init__(self) -> None:
        self.servers: dict[str, rpcframe.Server] = {}
        self.servicers: dict[str, ScriptedEcho] = {}
        self.addresses: dict[str, str] = {}
        for name in ("a", "b"):
            servicer = ScriptedEcho(name)
            server = rpcframe.Server(rpcframe.ServerConfig(grace_period=30, drain_delay=0))
            server.add(servicer)
            self.addresses[name] = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
            server.start()
            self.servers[name], self.servicers[name] = server, servicer
        # Connected before the client under test: a second channel to "a" made later
        # bounced the client's connection to it (IDLE, then READY again: slow start).
        self._held = rpcframe.connect(self.addresses["a"], _config())
        self._held.wait_ready(10)
        self.stopper: threading.Thread | None = None

    def drain_a(self) -> None:
        """Hold a call on "a", stop it, and wait until it refuses new calls."""
        stub = self._held.stub(echo_pb2_grpc.EchoServiceStub)
        stub.Echo.future(pb.EchoRequest(message="block"), timeout=30)
        assert self.servicers["a"].started.wait(10)
        self.stopper, _ = run_in_thread(self.servers["a"].stop)
        wait_until(lambda: self.servers["a"]._refusing, timeout=10)

    def close(self) -> None:
        for servicer in self.servicers.values():
            servicer.release.set()
        if self.stopper is not None:
            self.stopper.join(30)
        for server in self.servers.values():
            server.stop(0)
        self._held.close()


def _config() -> rpcframe.ChannelConfig:
    # No slow start: the endpoint that became READY second would get almost no
    # picks for seconds, and 20 quick calls could all miss the draining one.
    return rpcframe.ChannelConfig(health_check=False, policy="round_robin", default_timeout=10, slow_start=0)


@pytest.fixture
def draining() -> Iterator[_Draining]:
    servers = _Draining()
    try:
        yield servers
    finally:
        servers.close()


def _all_ready(channel: rpcframe.aio.Channel) -> Callable[[], Awaitable[bool]]:
    async def ready() -> bool:
        return set(_states(channel).values()) == {"READY"}

    return ready


def _states(channel: rpcframe.Channel | rpcframe.aio.Channel) -> dict[str, str]:
    return {e.address: e.state for e in channel.endpoint_states()}


def test_sync_client_stops_picking_a_draining_server(draining: _Draining) -> None:
    a, b = draining.addresses["a"], draining.addresses["b"]
    with rpcframe.connect([a, b], _config()) as channel:
        wait_until(lambda: set(_states(channel).values()) == {"READY"}, timeout=10)
        draining.drain_a()
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        answers = [stub.Echo(pb.EchoRequest(message="whoami")).message for _ in range(_CALLS)]
        assert answers == ["b"] * _CALLS
        assert _states(channel)[a] == "DRAINING"
        # Round robin alternates: without the mark half the calls would be refused and failed over.
        assert channel.counters()["failovers"] == 1
        draining.servicers["a"].release.set()
        wait_until(lambda: _states(channel)[a] != "DRAINING", timeout=20)  # its connection closed


async def test_aio_client_stops_picking_a_draining_server(draining: _Draining) -> None:
    a, b = draining.addresses["a"], draining.addresses["b"]
    async with rpcframe.aio.connect([a, b], _config()) as channel:
        await eventually(_all_ready(channel), within=10)
        draining.drain_a()
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        answers = [(await stub.Echo(pb.EchoRequest(message="whoami"))).message for _ in range(_CALLS)]
        assert answers == ["b"] * _CALLS
        assert _states(channel)[a] == "DRAINING"
        assert channel.counters()["failovers"] == 1
