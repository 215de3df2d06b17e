"""Health transitions and graceful drain on stop(), sync and asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import eventually, run_in_thread, wait_until
from tests.servicers import AioScriptedEcho, ScriptedEcho

SERVICE = "rpcframe.echo.v1.EchoService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _watch(channel: rpcframe.Channel, service: str) -> tuple[list[int], threading.Thread]:
    statuses: list[int] = []
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))

    def collect() -> None:
        try:
            for response in stream:
                statuses.append(response.status)
        except rpcframe.RpcError:
            pass  # the server ends watches when it stops

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    return statuses, thread


def _refused(stub: echo_pb2_grpc.EchoServiceStub) -> bool:
    try:
        stub.Echo(pb.EchoRequest(message="new"), timeout=2)
    except rpcframe.Unavailable:
        return True
    return False


def test_health_reports_each_service() -> None:
    server = rpcframe.Server()
    server.add(ScriptedEcho())
    port = server.bind("127.0.0.1:0")
    with server, rpcframe.connect(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status == SERVING
        with pytest.raises(rpcframe.NotFound):
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        server.set_serving(SERVICE, False)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status == NOT_SERVING
        server.set_serving(SERVICE, True)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status == SERVING


def test_graceful_stop_sync() -> None:
    servicer = ScriptedEcho()
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=30))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    server.start()
    with rpcframe.connect(f"127.0.0.1:{port}") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        statuses, watcher = _watch(channel, SERVICE)
        wait_until(lambda: statuses == [SERVING])
        in_flight = stub.Echo.future(pb.EchoRequest(message="block"))
        assert servicer.started.wait(5)

        stopper, _ = run_in_thread(server.stop)
        wait_until(lambda: NOT_SERVING in statuses)
        wait_until(lambda: _refused(stub))  # new calls are refused while draining
        assert stopper.is_alive()  # still waiting for the in-flight call

        servicer.release.set()
        assert in_flight.result(timeout=5).message == "block"
        stopper.join(10)  # far below the 30 s grace: stop ends when calls do
        assert not stopper.is_alive()
        watcher.join(5)
        assert not watcher.is_alive()
        assert server.wait(0)


def test_in_flight_call_cancelled_after_grace_sync() -> None:
    servicer = ScriptedEcho()
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=0.2))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    server.start()
    with rpcframe.connect(f"127.0.0.1:{port}") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        in_flight = stub.Echo.future(pb.EchoRequest(message="block"))
        assert servicer.started.wait(5)
        server.stop()
        assert servicer.cancelled.wait(5)
        with pytest.raises((rpcframe.Cancelled, rpcframe.Unavailable)):
            in_flight.result(timeout=5)
    servicer.release.set()


async def _awatch(channel: rpcframe.aio.Channel, statuses: list[int]) -> None:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    try:
        async for response in call:
            statuses.append(response.status)
    except rpcframe.RpcError:
        pass


async def _arefused(stub: echo_pb2_grpc.EchoServiceStub) -> bool:
    try:
        await stub.Echo(pb.EchoRequest(message="new"), timeout=2)
    except rpcframe.Unavailable:
        return True
    return False


class _AioStreamingEcho(AioScriptedEcho):
    async def Expand(self, request: pb.ExpandRequest, context: Any) -> AsyncIterator[pb.EchoResponse]:  # type: ignore[override]
        for _ in range(request.count):
            yield pb.EchoResponse(message=request.message)


async def _astream_refused(port: int) -> bool:
    """A server-streaming call is refused unrun (UNAVAILABLE with the never-run marker).

    Asked with a raw grpc channel: an rpcframe channel that has seen a
    refusal takes the draining server out of its picker and fails further
    calls before sending them.
    """
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        try:
            [r async for r in stub.Expand(pb.ExpandRequest(message="new", count=2), timeout=2)]
        except grpc.aio.AioRpcError as exc:
            return exc.code() is grpc.StatusCode.UNAVAILABLE and ("rpcframe-not-run", "1") in tuple(
                exc.trailing_metadata() or ()
            )
    return False


async def test_graceful_stop_aio() -> None:
    servicer = _AioStreamingEcho()
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=30))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    await server.start()
    async with rpcframe.aio.connect(f"127.0.0.1:{port}") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        statuses: list[int] = []
        watcher = asyncio.ensure_future(_awatch(channel, statuses))

        async def seen(status: int) -> bool:
            return status in statuses

        await eventually(lambda: seen(SERVING))
        in_flight = asyncio.ensure_future(stub.Echo(pb.EchoRequest(message="block")))
        await asyncio.wait_for(servicer.started.wait(), 5)

        stopper = asyncio.ensure_future(server.stop())
        await eventually(lambda: seen(NOT_SERVING))
        await eventually(lambda: _arefused(stub))
        assert await _astream_refused(port)
        assert not stopper.done()

        servicer.release.set()
        assert (await asyncio.wait_for(in_flight, 5)).message == "block"
        await asyncio.wait_for(stopper, 10)  # far below the 30 s grace
        await asyncio.wait_for(watcher, 5)


async def test_in_flight_call_cancelled_after_grace_aio() -> None:
    servicer = AioScriptedEcho()
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=0.2))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    await server.start()
    async with rpcframe.aio.connect(f"127.0.0.1:{port}") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        in_flight = asyncio.ensure_future(stub.Echo(pb.EchoRequest(message="block")))
        await asyncio.wait_for(servicer.started.wait(), 5)
        await asyncio.wait_for(server.stop(), 10)
        await asyncio.wait_for(servicer.cancelled.wait(), 5)
        with pytest.raises((rpcframe.Cancelled, rpcframe.Unavailable)):
            await asyncio.wait_for(in_flight, 5)


def test_stop_is_idempotent() -> None:
    server = rpcframe.Server()
    server.add(ScriptedEcho())
    server.bind("127.0.0.1:0")
    server.start()
    server.stop()
    server.stop()
    assert server.wait(0)


def test_raw_grpc_status_codes_seen_by_raw_client() -> None:
    """A raw grpcio client sees the same health service (interop sanity)."""
    server = rpcframe.Server()
    server.add(ScriptedEcho())
    port = server.bind("127.0.0.1:0")
    with server, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert response.status == SERVING
