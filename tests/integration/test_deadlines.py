"""Deadlines across real hops and cancellation cascades, sync and asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import eventually, wait_until
from tests.servicers import AioScriptedEcho, ScriptedEcho

CONFIG = rpcframe.ChannelConfig(slow_start=0)
# grpc rounds a timeout up when it encodes the grpc-timeout header (coarser
# units for longer timeouts, for header compression), so a hop can see a few
# ms more than its caller had left.
GRPC_TIMEOUT_ROUNDING = 1.01


class Relay(ScriptedEcho):
    """``relay:<msg>`` forwards ``<msg>`` downstream; ``late:<s>:<msg>`` waits ``s`` first."""

    def __init__(self, downstream: str) -> None:
        super().__init__()
        self.channel = rpcframe.connect(downstream, CONFIG)
        self.stub = self.channel.stub(echo_pb2_grpc.EchoServiceStub)
        self.errors: list[BaseException] = []
        self.forwarded = threading.Event()

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        kind, _, rest = request.message.partition(":")
        if kind == "late":
            delay, _, rest = rest.partition(":")
            time.sleep(float(delay))
            kind = "relay"
        if kind != "relay":
            return super().Echo(request, context)
        try:
            return self.stub.Echo(pb.EchoRequest(message=rest))
        except rpcframe.RpcError as exc:
            self.errors.append(exc)
            raise
        finally:
            self.forwarded.set()


class AioRelay(AioScriptedEcho):
    """The asyncio :class:`Relay`."""

    def __init__(self) -> None:
        super().__init__()
        self.stub: Any = None
        self.errors: list[BaseException] = []

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:  # type: ignore[override]
        kind, _, rest = request.message.partition(":")
        if kind == "late":
            delay, _, rest = rest.partition(":")
            await asyncio.sleep(float(delay))
            kind = "relay"
        if kind != "relay":
            return await super().Echo(request, context)
        try:
            return await self.stub.Echo(pb.EchoRequest(message=rest))  # type: ignore[no-any-return]
        except rpcframe.RpcError as exc:
            self.errors.append(exc)
            raise


def _serve(servicer: object) -> tuple[rpcframe.Server, str]:
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1))
    server.add(servicer)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    return server, address


@pytest.fixture
def chain() -> Iterator[tuple[str, list[Relay], ScriptedEcho]]:
    """client -> relay b -> relay c -> echo d (3 hops), thread-pool servers."""
    last = ScriptedEcho("d")
    servers = [_serve(last)]
    relays: list[Relay] = []
    for _ in range(2):
        relay = Relay(servers[-1][1])
        relays.insert(0, relay)
        servers.append(_serve(relay))
    yield servers[-1][1], relays, last
    last.release.set()
    for server, _ in reversed(servers):
        server.stop(0)
    for relay in relays:
        relay.channel.close()


def _remaining_seen(message: str) -> float:
    assert message != "none", "the last hop saw no deadline"
    return float(message)


def test_deadline_reaches_the_third_hop(chain: tuple[str, list[Relay], ScriptedEcho]) -> None:
    entry, _, _ = chain
    with rpcframe.connect(entry, CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        seen = _remaining_seen(stub.Echo(pb.EchoRequest(message="relay:relay:deadline"), timeout=3.0).message)
        assert 1.0 < seen <= 3.0 * GRPC_TIMEOUT_ROUNDING
        without = stub.Echo(pb.EchoRequest(message="relay:relay:deadline")).message
        assert without == "none"


def test_expired_deadline_is_never_sent(chain: tuple[str, list[Relay], ScriptedEcho]) -> None:
    entry, relays, last = chain
    with rpcframe.connect(entry, CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(rpcframe.DeadlineExceeded):
            stub.Echo(pb.EchoRequest(message="late:0.4:relay:hi"), timeout=0.2)
        wait_until(relays[0].forwarded.is_set)
    error = relays[0].errors[0]
    assert isinstance(error, rpcframe.DeadlineExceeded)
    assert "not sent" in error.details()
    assert relays[1].calls == 0
    assert last.calls == 0


def test_deadline_after_block_bounds_calls_at_the_edge(chain: tuple[str, list[Relay], ScriptedEcho]) -> None:
    entry, _, _ = chain
    with rpcframe.connect(entry, CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with rpcframe.deadline_after(2.0):
            seen = _remaining_seen(stub.Echo(pb.EchoRequest(message="relay:deadline"), timeout=30).message)
        assert 0.5 < seen <= 2.0 * GRPC_TIMEOUT_ROUNDING


def test_cancelling_the_first_call_cancels_the_last_hop(chain: tuple[str, list[Relay], ScriptedEcho]) -> None:
    entry, _, last = chain
    with rpcframe.connect(entry, CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        future = stub.Echo.future(pb.EchoRequest(message="relay:relay:block"), timeout=10)
        wait_until(last.started.is_set)
        future.cancel()
        wait_until(last.cancelled.is_set)
        assert not last.finished.is_set()


def test_server_max_deadline_caps_what_handlers_pass_on() -> None:
    last = ScriptedEcho("d")
    servers = [_serve(last)]
    relay = Relay(servers[0][1])
    capped = rpcframe.Server(rpcframe.ServerConfig(max_deadline=0.5))
    capped.add(relay)
    address = f"127.0.0.1:{capped.bind('127.0.0.1:0')}"
    capped.start()
    try:
        with rpcframe.connect(address, CONFIG) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            seen = _remaining_seen(stub.Echo(pb.EchoRequest(message="relay:deadline")).message)
            assert 0.1 < seen <= 0.5
    finally:
        capped.stop(0)
        servers[0][0].stop(0)
        relay.channel.close()


# -- asyncio -----------------------------------------------------------------------


@pytest.fixture
async def aio_chain() -> AsyncIterator[tuple[str, list[AioRelay], AioScriptedEcho]]:
    last = AioScriptedEcho("d")
    servicers: list[Any] = [last, AioRelay(), AioRelay()]
    servers, channels, address = [], [], ""
    for servicer in servicers:
        if isinstance(servicer, AioRelay):
            channel = rpcframe.aio.connect(address, CONFIG)
            channels.append(channel)
            servicer.stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1))
        server.add(servicer)
        address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
        await server.start()
        servers.append(server)
    yield address, servicers[:0:-1], last
    last.release.set()
    for channel in channels:
        await channel.close()
    for server in reversed(servers):
        await server.stop(0)


async def test_aio_deadline_reaches_the_third_hop(aio_chain: tuple[str, list[AioRelay], AioScriptedEcho]) -> None:
    entry, _, _ = aio_chain
    async with rpcframe.aio.connect(entry, CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        response = await stub.Echo(pb.EchoRequest(message="relay:relay:deadline"), timeout=3.0)
        assert 1.0 < _remaining_seen(response.message) <= 3.0 * GRPC_TIMEOUT_ROUNDING
        assert (await stub.Echo(pb.EchoRequest(message="relay:relay:deadline"))).message == "none"


async def test_aio_expired_deadline_is_never_sent(aio_chain: tuple[str, list[AioRelay], AioScriptedEcho]) -> None:
    entry, relays, last = aio_chain
    async with rpcframe.aio.connect(entry, CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(rpcframe.DeadlineExceeded):
            await stub.Echo(pb.EchoRequest(message="late:0.4:relay:hi"), timeout=0.2)

        async def relay_gave_up() -> bool:
            return bool(relays[0].errors) or relays[0].calls == 0

        await eventually(relay_gave_up)
    # The relay's handler was cancelled at the deadline, or refused to send.
    assert relays[1].calls == 0
    assert last.calls == 0


async def test_aio_cancel_cascades_to_the_last_hop(aio_chain: tuple[str, list[AioRelay], AioScriptedEcho]) -> None:
    entry, _, last = aio_chain
    async with rpcframe.aio.connect(entry, CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        call = stub.Echo(pb.EchoRequest(message="relay:relay:block"), timeout=10)
        task = asyncio.ensure_future(call)
        async with asyncio.timeout(5):
            await last.started.wait()
        task.cancel()
        async with asyncio.timeout(5):
            await last.cancelled.wait()
        assert not last.finished.is_set()
        with pytest.raises(asyncio.CancelledError):
            await task
