"""The asyncio client's unary attempts without grpc.aio's call object (rpcframe.client._aio_unary).

They must behave as grpc.aio's unary calls do: sent when made (not when
awaited), ended and their callbacks run when nobody awaits them, cancelled
on the server when the awaiting task is, waited for and then cancelled by
``close(grace)``; and the fast path must actually be the one taken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

import rpcframe
import rpcframe.aio
from examples.echo import AioEchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.client import _aio_unary
from rpcframe.client._aio_unary import LeanUnary, UnaryAttempt
from tests.conftest import Running


@pytest.fixture
async def channel(aio_server: Running) -> AsyncIterator[rpcframe.aio.Channel]:
    async with rpcframe.aio.connect(aio_server.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        yield channel


def _stub(channel: rpcframe.aio.Channel) -> Any:
    return channel.stub(echo_pb2_grpc.EchoServiceStub)


async def test_unary_calls_take_the_lean_path(channel: rpcframe.aio.Channel) -> None:
    call = _stub(channel).Echo(pb.EchoRequest(message="lean"))
    assert type(call._call) is UnaryAttempt
    assert (await call).message == "lean"
    assert _aio_unary.available
    (entry,) = channel._core.entries()
    assert any(type(mc) is LeanUnary for mc in entry.stats.handle.calls.values())


async def test_compressed_calls_take_grpc_aio(channel: rpcframe.aio.Channel) -> None:
    call = _stub(channel).Echo(pb.EchoRequest(message="gz"), compression=grpc.Compression.Gzip)
    assert type(call._call) is not UnaryAttempt
    assert (await call).message == "gz"


class _Together(AioEchoServicer):
    """Answers each call once ``expected`` calls have arrived (or "alone" after 5 s)."""

    def __init__(self, expected: int) -> None:
        self.expected, self.arrived, self.changed = expected, 0, asyncio.Event()

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:  # type: ignore[override]
        self.arrived += 1
        self.changed.set()
        try:
            await asyncio.wait_for(self._all_here(), 5)
        except TimeoutError:
            return pb.EchoResponse(message="alone")
        return pb.EchoResponse(message="together")

    async def _all_here(self) -> None:
        while self.arrived < self.expected:
            self.changed.clear()
            await self.changed.wait()


async def test_calls_are_sent_when_made_not_when_awaited() -> None:
    # Three calls made, then awaited one by one: the server answers only once all three arrived.
    server = rpcframe.aio.Server()
    server.add(_Together(3))
    port = server.bind("127.0.0.1:0")
    await server.start()
    try:
        async with rpcframe.aio.connect(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            stub = _stub(channel)
            calls = [stub.Echo(pb.EchoRequest(message=str(i)), timeout=10) for i in range(3)]
            assert [(await call).message for call in calls] == ["together"] * 3
    finally:
        await server.stop(0)


async def test_an_unawaited_call_ends_and_runs_its_done_callbacks(channel: rpcframe.aio.Channel) -> None:
    ended = asyncio.Event()
    call = _stub(channel).Echo(pb.EchoRequest(message="nobody awaits"))
    seen: list[Any] = []
    call.add_done_callback(lambda c: (seen.append(c), ended.set()))
    await asyncio.wait_for(ended.wait(), 5)
    assert seen == [call]
    assert call.done()
    assert await call.code() == grpc.StatusCode.OK
    assert (await call).message == "nobody awaits"  # the response is kept for a late await


async def test_cancelling_the_awaiting_task_cancels_the_call(
    channel: rpcframe.aio.Channel, aio_server: Running
) -> None:
    task = asyncio.ensure_future(_stub(channel).Echo(pb.EchoRequest(message="block"), timeout=10))
    await asyncio.wait_for(aio_server.servicer.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(aio_server.servicer.cancelled.wait(), 5)  # the server saw it go
    (entry,) = channel._core.entries()
    assert entry.stats.inflight == 0  # the pick was released


async def test_cancel_before_awaiting(channel: rpcframe.aio.Channel) -> None:
    call = _stub(channel).Echo(pb.EchoRequest(message="block"), timeout=10)
    assert call.cancel()
    with pytest.raises(rpcframe.Cancelled):
        await call
    assert call.cancelled()
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_two_tasks_awaiting_one_call_both_get_the_response(channel: rpcframe.aio.Channel) -> None:
    call = _stub(channel).Echo(pb.EchoRequest(message="sleep:0.05"), timeout=10)

    async def wait() -> str:
        return str((await call).message)

    assert await asyncio.gather(wait(), wait()) == ["sleep:0.05", "sleep:0.05"]
    (entry,) = channel._core.entries()
    assert entry.stats.inflight == 0


async def test_status_and_metadata_of_a_failed_and_an_answered_call(channel: rpcframe.aio.Channel) -> None:
    stub = _stub(channel)
    failed = stub.Echo(pb.EchoRequest(message="raise:NotFound:no such thing"))
    with pytest.raises(rpcframe.NotFound) as caught:
        await failed
    assert caught.value.details() == "no such thing"
    assert ("x-error-ref", "42") in caught.value.trailing_metadata()
    assert await failed.code() == grpc.StatusCode.NOT_FOUND
    assert await failed.details() == "no such thing"
    assert ("x-error-ref", "42") in tuple(await failed.trailing_metadata())

    answered = stub.Echo(pb.EchoRequest(message="md"), metadata=(("echo-token", "abc"),))
    await answered
    assert await answered.code() == grpc.StatusCode.OK
    assert isinstance(await answered.initial_metadata(), grpc.aio.Metadata)
    assert isinstance(await answered.trailing_metadata(), grpc.aio.Metadata)


async def test_close_with_grace_waits_for_the_call_then_cancels_it(aio_server: Running) -> None:
    channel = rpcframe.aio.connect(aio_server.target)
    await asyncio.wait_for(channel.channel_ready(), 10)
    stub = _stub(channel)
    quick = asyncio.ensure_future(stub.Echo(pb.EchoRequest(message="sleep:0.05"), timeout=10))
    stuck = asyncio.ensure_future(stub.Echo(pb.EchoRequest(message="block"), timeout=10))
    await asyncio.wait_for(aio_server.servicer.started.wait(), 5)
    await channel.close(grace=0.5)
    assert (await quick).message == "sleep:0.05"  # ended within the grace
    with pytest.raises(asyncio.CancelledError):
        await stuck  # still running after it: cancelled, as grpc.aio's channel does with its calls
    await asyncio.wait_for(aio_server.servicer.cancelled.wait(), 5)


async def test_metadata_grpc_cannot_send_fails_as_with_grpc_aio(channel: rpcframe.aio.Channel) -> None:
    with pytest.raises(TypeError, match="expected bytes"):
        await _stub(channel).Echo(pb.EchoRequest(message="x"), metadata=(("x-bin", "not bytes"),), timeout=5)
    assert (await _stub(channel).Echo(pb.EchoRequest(message="after"), timeout=5)).message == "after"


async def test_a_cython_channel_that_refuses_the_arguments_falls_back_to_grpc_aio(
    channel: rpcframe.aio.Channel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_aio_unary, "available", True)
    stub = _stub(channel)
    await stub.Echo(pb.EchoRequest(message="warm"))
    (entry,) = channel._core.entries()
    (lean,) = [mc for mc in entry.stats.handle.calls.values() if type(mc) is LeanUnary]

    class Refusing:
        def call(self, *args: Any) -> Any:
            raise TypeError("call() takes exactly 4 positional arguments")

    monkeypatch.setattr(lean, "_channel", Refusing())
    with caplog.at_level(logging.WARNING, logger=_aio_unary.__name__):
        call = stub.Echo(pb.EchoRequest(message="fallback"))
    assert type(call._call) is not UnaryAttempt
    assert (await call).message == "fallback"
    assert not _aio_unary.available
    assert "using grpc.aio's calls" in caplog.text
