"""Every call kind through the asyncio client against a real asyncio server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import Running


@pytest.fixture
async def stub(aio_server: Running):  # type: ignore[no-untyped-def]
    async with rpcframe.aio.connect(aio_server.target) as channel:
        yield channel.stub(echo_pb2_grpc.EchoServiceStub)


async def _requests(*messages: str) -> AsyncIterator[pb.EchoRequest]:
    for m in messages:
        yield pb.EchoRequest(message=m)


async def test_unary(stub) -> None:  # type: ignore[no-untyped-def]
    assert (await stub.Echo(pb.EchoRequest(message="hello"))).message == "hello"


async def test_server_stream(stub) -> None:  # type: ignore[no-untyped-def]
    responses = [r async for r in stub.Expand(pb.ExpandRequest(message="m", count=5))]
    assert [(r.message, r.index) for r in responses] == [("m", i) for i in range(5)]


async def test_server_stream_read(stub) -> None:  # type: ignore[no-untyped-def]
    call = stub.Expand(pb.ExpandRequest(message="m", count=2))
    assert (await call.read()).index == 0
    assert (await call.read()).index == 1
    assert await call.read() is grpc.aio.EOF


async def test_client_stream(stub) -> None:  # type: ignore[no-untyped-def]
    response = await stub.Collect(_requests("a", "bc", "d"))
    assert (response.count, response.message) == (3, "abcd")


async def test_client_stream_with_writes(stub) -> None:  # type: ignore[no-untyped-def]
    call = stub.Collect()
    for m in ("x", "y"):
        await call.write(pb.EchoRequest(message=m))
    await call.done_writing()
    response = await call
    assert (response.count, response.message) == (2, "xy")


async def test_bidi_stream(stub) -> None:  # type: ignore[no-untyped-def]
    responses = [r async for r in stub.Chat(_requests("0", "1", "2"))]
    assert [(r.message, r.index) for r in responses] == [(str(i), i) for i in range(3)]


async def test_bidi_ping_pong(stub) -> None:  # type: ignore[no-untyped-def]
    call = stub.Chat()
    for i in range(3):
        await call.write(pb.EchoRequest(message=f"ping{i}"))
        response = await call.read()
        assert (response.message, response.index) == (f"ping{i}", i)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


async def test_stubs_are_rpcframe_wrappers(stub) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(stub.Echo, rpcframe.client._aio.UnaryUnary)
    assert isinstance(stub.Echo, grpc.aio.UnaryUnaryMultiCallable)


async def test_metadata_both_ways(stub) -> None:  # type: ignore[no-untyped-def]
    call = stub.Echo(pb.EchoRequest(message="md"), metadata=(("echo-token", "abc"), ("x-trace", "t1")))
    assert (await call).message == "md"
    assert ("echo-token", "abc") in [tuple(m) for m in await call.initial_metadata()]
    assert ("x-trace", "t1") in [tuple(m) for m in await call.trailing_metadata()]
    assert await call.code() is grpc.StatusCode.OK


async def test_channel_default_metadata_and_timeout(aio_server: Running) -> None:
    config = rpcframe.ChannelConfig(default_timeout=3.0, metadata=(("x-default", "1"),))
    async with rpcframe.aio.connect(aio_server.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        call = stub.Echo(pb.EchoRequest(message="x"))
        await call
        assert ("x-default", "1") in [tuple(m) for m in await call.trailing_metadata()]
        remaining = float((await stub.Echo(pb.EchoRequest(message="deadline"))).message)
        # grpc rounds the wire timeout up slightly, hence the small allowance.
        assert 2.0 < remaining <= 3.1


async def test_no_default_timeout_means_no_deadline(stub) -> None:  # type: ignore[no-untyped-def]
    assert (await stub.Echo(pb.EchoRequest(message="deadline"))).message == "none"


async def test_deadline_exceeded(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rpcframe.DeadlineExceeded):
        await stub.Echo(pb.EchoRequest(message="sleep:1"), timeout=0.05)


async def test_stream_deadline_exceeded(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rpcframe.DeadlineExceeded):
        async for _ in stub.Chat(_slow_requests(), timeout=0.1):
            pass


async def _slow_requests() -> AsyncIterator[pb.EchoRequest]:
    yield pb.EchoRequest(message="first")
    await asyncio.sleep(5)  # the deadline ends the call long before this
    yield pb.EchoRequest(message="never")


async def test_client_cancellation_reaches_server(stub, aio_server: Running) -> None:  # type: ignore[no-untyped-def]
    servicer = aio_server.servicer
    call = stub.Echo(pb.EchoRequest(message="block"))
    task = asyncio.ensure_future(call)
    await asyncio.wait_for(servicer.started.wait(), 5)
    assert call.cancel()
    await asyncio.wait_for(servicer.cancelled.wait(), 5)
    assert not servicer.finished.is_set()
    # One error tree: the RPC was cancelled, not the task (was asyncio.CancelledError).
    with pytest.raises(rpcframe.Cancelled):
        await task
    assert call.cancelled()


async def test_task_cancellation_cancels_call(stub, aio_server: Running) -> None:  # type: ignore[no-untyped-def]
    servicer = aio_server.servicer
    task = asyncio.ensure_future(stub.Echo(pb.EchoRequest(message="block")))
    await asyncio.wait_for(servicer.started.wait(), 5)
    task.cancel()
    await asyncio.wait_for(servicer.cancelled.wait(), 5)


@pytest.mark.parametrize(
    ("message", "error", "details"),
    [
        ("raise:NotFound:order 7", rpcframe.NotFound, "order 7"),
        ("raise:Unauthenticated:who", rpcframe.Unauthenticated, "who"),
        ("py:ValueError:bad size", rpcframe.InvalidArgument, "bad size"),
        ("py:FileNotFoundError:nofile", rpcframe.NotFound, "nofile"),
        ("py:ConnectionError:db down", rpcframe.Unavailable, "db down"),
        ("abort:FAILED_PRECONDITION:not yet", rpcframe.FailedPrecondition, "not yet"),
    ],
)
async def test_error_mapping(stub, message: str, error: type[rpcframe.RpcError], details: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        await stub.Echo(pb.EchoRequest(message=message))
    assert info.value.details() == details


async def test_framework_error_keeps_trailing_metadata(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rpcframe.NotFound) as info:
        await stub.Echo(pb.EchoRequest(message="raise:NotFound:gone"))
    assert ("x-error-ref", "42") in [tuple(m) for m in info.value.trailing_metadata()]


async def test_unexpected_exception_is_internal(stub, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rpcframe.Internal) as info:
        await stub.Echo(pb.EchoRequest(message="py:KeyError:secret-column"))
    assert "secret-column" not in info.value.details()
    ref = info.value.details().removeprefix("internal server error (ref ").rstrip(")")
    record = next(r for r in caplog.records if ref in r.getMessage())
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError
    assert (await stub.Echo(pb.EchoRequest(message="ok"))).message == "ok"


async def test_streaming_handler_errors_are_mapped(aio_server: Running) -> None:
    class Failing(echo_pb2_grpc.EchoServiceServicer):
        async def Expand(self, request, context):  # type: ignore[no-untyped-def]
            yield pb.EchoResponse(message="one")
            raise rpcframe.ResourceExhausted("quota")

    server = rpcframe.aio.Server()
    server.add(Failing())
    port = server.bind("127.0.0.1:0")
    async with server, rpcframe.aio.connect(f"127.0.0.1:{port}") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        call = stub.Expand(pb.ExpandRequest(count=3))
        assert (await call.read()).message == "one"
        with pytest.raises(rpcframe.ResourceExhausted, match="quota"):
            await call.read()
        with pytest.raises(rpcframe.Unimplemented):
            await stub.Echo(pb.EchoRequest())


async def test_many_concurrent_calls(stub) -> None:  # type: ignore[no-untyped-def]
    results = await asyncio.gather(*(stub.Echo(pb.EchoRequest(message=str(i))) for i in range(50)))
    assert [r.message for r in results] == [str(i) for i in range(50)]
