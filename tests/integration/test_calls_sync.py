"""Every call kind through the sync client against a real sync server."""

from __future__ import annotations

import grpc
import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import Running, run_in_thread, wait_until


@pytest.fixture
def stub(sync_server: Running):  # type: ignore[no-untyped-def]
    with rpcframe.connect(sync_server.target) as channel:
        yield channel.stub(echo_pb2_grpc.EchoServiceStub)


def test_unary(stub) -> None:  # type: ignore[no-untyped-def]
    assert stub.Echo(pb.EchoRequest(message="hello")).message == "hello"


def test_server_stream(stub) -> None:  # type: ignore[no-untyped-def]
    responses = list(stub.Expand(pb.ExpandRequest(message="m", count=5)))
    assert [(r.message, r.index) for r in responses] == [("m", i) for i in range(5)]


def test_client_stream(stub) -> None:  # type: ignore[no-untyped-def]
    response = stub.Collect(pb.EchoRequest(message=m) for m in ["a", "bc", "d"])
    assert (response.count, response.message) == (3, "abcd")


def test_bidi_stream(stub) -> None:  # type: ignore[no-untyped-def]
    responses = stub.Chat(pb.EchoRequest(message=str(i)) for i in range(4))
    assert [(r.message, r.index) for r in responses] == [(str(i), i) for i in range(4)]


def test_stubs_are_rpcframe_wrappers(stub) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(stub.Echo, rpcframe.client._sync.UnaryUnary)
    assert isinstance(stub.Echo, grpc.UnaryUnaryMultiCallable)
    assert isinstance(stub.Chat, rpcframe.client._sync.StreamStream)


def test_metadata_both_ways(stub) -> None:  # type: ignore[no-untyped-def]
    response, call = stub.Echo.with_call(
        pb.EchoRequest(message="md"), metadata=(("echo-token", "abc"), ("x-trace", "t1"))
    )
    assert response.message == "md"
    assert ("echo-token", "abc") in [tuple(m) for m in call.initial_metadata()]
    assert ("x-trace", "t1") in [tuple(m) for m in call.trailing_metadata()]


def test_stream_metadata_both_ways(stub) -> None:  # type: ignore[no-untyped-def]
    call = stub.Expand(pb.ExpandRequest(message="m", count=2), metadata=(("x-k", "v"),))
    assert len(list(call)) == 2
    assert ("x-k", "v") in [tuple(m) for m in call.trailing_metadata()]
    assert call.code() is grpc.StatusCode.OK


def test_channel_default_metadata_and_timeout(sync_server: Running) -> None:
    config = rpcframe.ChannelConfig(default_timeout=3.0, metadata=(("x-default", "1"),))
    with rpcframe.connect(sync_server.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        _, call = stub.Echo.with_call(pb.EchoRequest(message="x"), metadata=(("x-call", "2"),))
        trailing = [tuple(m) for m in call.trailing_metadata()]
        assert ("x-default", "1") in trailing
        assert ("x-call", "2") in trailing
        remaining = float(stub.Echo(pb.EchoRequest(message="deadline")).message)
        # grpc rounds the wire timeout up slightly, hence the small allowance.
        assert 2.0 < remaining <= 3.1


def test_deadline_exceeded(stub, sync_server: Running) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rpcframe.DeadlineExceeded) as info:
        stub.Echo(pb.EchoRequest(message="sleep:1"), timeout=0.05)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_deadline_exceeded_is_also_grpc_rpc_error(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        stub.Echo(pb.EchoRequest(message="sleep:1"), timeout=0.05)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_cancellation_reaches_server(stub, sync_server: Running) -> None:  # type: ignore[no-untyped-def]
    servicer = sync_server.servicer
    future = stub.Echo.future(pb.EchoRequest(message="block"))
    assert servicer.started.wait(5)
    assert future.cancel()
    assert servicer.cancelled.wait(5)
    # One error tree: a cancelled future raises rpcframe.Cancelled (was grpc.FutureCancelledError).
    with pytest.raises(rpcframe.Cancelled):
        future.result()
    assert future.cancelled()
    assert future.code() is grpc.StatusCode.CANCELLED


def test_stream_cancellation(stub) -> None:  # type: ignore[no-untyped-def]
    call = stub.Expand(pb.ExpandRequest(message="m", count=10_000))
    first = next(call)
    assert first.index == 0
    call.cancel()
    with pytest.raises(rpcframe.Cancelled):
        for _ in call:
            pass


def test_future_result(stub) -> None:  # type: ignore[no-untyped-def]
    future = stub.Echo.future(pb.EchoRequest(message="later"))
    assert future.result(timeout=5).message == "later"
    failing = stub.Echo.future(pb.EchoRequest(message="raise:NotFound:gone"))
    with pytest.raises(rpcframe.NotFound):
        failing.result(timeout=5)
    assert isinstance(failing.exception(), rpcframe.NotFound)


@pytest.mark.parametrize(
    ("message", "error", "details"),
    [
        ("raise:NotFound:order 7", rpcframe.NotFound, "order 7"),
        ("raise:PermissionDenied:no", rpcframe.PermissionDenied, "no"),
        ("raise:Unavailable:busy", rpcframe.Unavailable, "busy"),
        ("py:ValueError:bad size", rpcframe.InvalidArgument, "bad size"),
        ("py:NotImplementedError:later", rpcframe.Unimplemented, "later"),
        ("py:PermissionError:denied", rpcframe.PermissionDenied, "denied"),
        ("py:TimeoutError:slow db", rpcframe.DeadlineExceeded, "slow db"),
        ("abort:FAILED_PRECONDITION:not yet", rpcframe.FailedPrecondition, "not yet"),
    ],
)
def test_error_mapping(stub, message: str, error: type[rpcframe.RpcError], details: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        stub.Echo(pb.EchoRequest(message=message))
    assert info.value.details() == details


def test_framework_error_keeps_trailing_metadata(stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rpcframe.NotFound) as info:
        stub.Echo(pb.EchoRequest(message="raise:NotFound:gone"))
    assert ("x-error-ref", "42") in [tuple(m) for m in info.value.trailing_metadata()]


def test_unexpected_exception_is_internal_without_traceback(stub, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(rpcframe.Internal) as info:
        stub.Echo(pb.EchoRequest(message="py:KeyError:secret-column"))
    details = info.value.details()
    assert "secret-column" not in details
    assert "Traceback" not in details
    assert details.startswith("internal server error (ref ")
    ref = details.removeprefix("internal server error (ref ").rstrip(")")
    wait_until(lambda: any(ref in r.getMessage() for r in caplog.records))
    record = next(r for r in caplog.records if ref in r.getMessage())
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError
    # The server keeps serving.
    assert stub.Echo(pb.EchoRequest(message="still here")).message == "still here"


def test_unimplemented_method_of_servicer(sync_server: Running) -> None:
    class Partial(echo_pb2_grpc.EchoServiceServicer):
        pass

    server = rpcframe.Server()
    server.add(Partial())
    port = server.bind("127.0.0.1:0")
    with server, rpcframe.connect(f"127.0.0.1:{port}") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(rpcframe.Unimplemented):
            stub.Echo(pb.EchoRequest(message="x"))


def test_concurrent_calls_from_threads(stub) -> None:  # type: ignore[no-untyped-def]
    threads = [run_in_thread(lambda i=i: stub.Echo(pb.EchoRequest(message=str(i))).message) for i in range(8)]
    for thread, _ in threads:
        thread.join(10)
    assert sorted(out[0] for _, out in threads) == sorted(str(i) for i in range(8))
