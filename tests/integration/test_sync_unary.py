"""The sync client's blocking unary calls without grpc's per-call state (rpcframe.client._sync_unary).

Each behaviour is checked against grpc's own multicallable on the same
channel: the same errors, deadlines, wait-for-ready and the deadline grpc
propagates from an incoming grpc call; and the fast path must be the one taken.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.client import _sync_unary
from rpcframe.client._sync_unary import LeanSyncUnary
from tests.conftest import Running

ECHO = "/rpcframe.echo.v1.EchoService/Echo"


@pytest.fixture
def grpc_channel(sync_server: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sync_server.target) as channel:
        yield channel


def _pair(channel: grpc.Channel, deserializer: Any = pb.EchoResponse.FromString) -> tuple[Any, LeanSyncUnary]:
    """grpc's multicallable for Echo and the lean one over it."""
    mc = channel.unary_unary(ECHO, pb.EchoRequest.SerializeToString, deserializer, _registered_method=True)
    lean = _sync_unary.lean_sync_unary(mc)
    assert type(lean) is LeanSyncUnary
    return mc, lean


def _failure(call: Any, message: str, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(pb.EchoRequest(message=message), **kwargs)
    return caught.value


def test_rpcframe_unary_calls_take_the_lean_path(sync_server: Running) -> None:
    with rpcframe.connect(sync_server.target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(pb.EchoRequest(message="lean"), timeout=10).message == "lean"
        (entry,) = channel._core.entries()
        assert any(type(mc) is LeanSyncUnary for mc in entry.stats.handle.calls.values())
    assert _sync_unary.available


def test_answers_and_errors_are_grpcs(grpc_channel: grpc.Channel) -> None:
    mc, lean = _pair(grpc_channel)
    assert lean(pb.EchoRequest(message="hi"), timeout=10).message == mc(pb.EchoRequest(message="hi")).message
    theirs, ours = (_failure(call, "raise:NotFound:gone", timeout=10) for call in (mc, lean))
    assert type(ours) is type(theirs)
    assert (ours.code(), ours.details()) == (theirs.code(), theirs.details()) == (grpc.StatusCode.NOT_FOUND, "gone")
    assert ("x-error-ref", "42") in ours.trailing_metadata()
    assert ours.initial_metadata() == theirs.initial_metadata()
    assert ours.debug_error_string()


def test_deadline(grpc_channel: grpc.Channel) -> None:
    _, lean = _pair(grpc_channel)
    assert _failure(lean, "sleep:1", timeout=0.1).code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_wait_for_ready_is_sent() -> None:
    # Nothing listens on port 1 of 127.0.0.1: without wait-for-ready a call fails at once, with it
    # the call waits for a connection until its deadline.
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        _, lean = _pair(channel)
        assert _failure(lean, "x", timeout=5, wait_for_ready=False).code() == grpc.StatusCode.UNAVAILABLE
        assert _failure(lean, "x", timeout=0.3, wait_for_ready=True).code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_response_that_does_not_deserialize_fails_internal_as_with_grpc(grpc_channel: grpc.Channel) -> None:
    def broken(data: bytes) -> Any:
        raise ValueError("no")

    mc, lean = _pair(grpc_channel, broken)
    theirs, ours = (_failure(call, "x", timeout=10) for call in (mc, lean))
    assert (ours.code(), ours.details()) == (theirs.code(), theirs.details())
    assert ours.code() == grpc.StatusCode.INTERNAL


def test_a_request_that_does_not_serialize_fails_as_with_grpc(grpc_channel: grpc.Channel) -> None:
    mc, lean = _pair(grpc_channel)
    with pytest.raises(grpc.RpcError) as theirs:
        mc(object(), timeout=10)
    with pytest.raises(grpc.RpcError) as ours:
        lean(object(), timeout=10)
    assert (ours.value.code(), ours.value.details()) == (theirs.value.code(), theirs.value.details())


def test_a_call_made_inside_a_grpc_handler_gets_the_deadline_grpc_gives_it(sync_server: Running) -> None:
    # A raw grpc server whose handler calls the scripted echo without a timeout: the lean call
    # asks grpc for a deadline to carry over as grpc's own call does (grpcio 1.85 gives none here).
    with grpc.insecure_channel(sync_server.target) as downstream:
        mc, lean = _pair(downstream)

        def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
            call = lean if request == b"lean" else mc
            return call(pb.EchoRequest(message="deadline")).message.encode()

        server = grpc.server(futures.ThreadPoolExecutor(2))
        methods = {"Go": grpc.unary_unary_rpc_method_handler(relay)}
        handler = grpc.method_handlers_generic_handler("relay.Relay", methods)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                go = channel.unary_unary("/relay.Relay/Go")
                remaining = {which: go(which, timeout=5) for which in (b"grpc", b"lean")}
        finally:
            server.stop(0)
    assert (remaining[b"lean"] == b"none") == (remaining[b"grpc"] == b"none")


def test_compressed_calls_take_grpcs_multicallable(grpc_channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch) -> None:
    _, lean = _pair(grpc_channel)
    sent: list[Any] = []
    fallback = lean.fallback
    monkeypatch.setattr(lean, "fallback", lambda *args: sent.append(args) or fallback(*args))
    assert lean(pb.EchoRequest(message="gz"), 10, None, None, None, grpc.Compression.Gzip).message == "gz"
    assert len(sent) == 1


def test_a_cython_channel_that_refuses_the_arguments_falls_back(
    grpc_channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_sync_unary, "available", True)
    _, lean = _pair(grpc_channel)
    # The caller's own bad metadata: grpc refuses it too, and the lean path stays on.
    with pytest.raises(TypeError):
        lean(pb.EchoRequest(message="x"), 10, (("x-bin", "not bytes"),))
    assert _sync_unary.available

    class Refusing:
        def segregated_call(self, *args: Any) -> Any:
            raise TypeError("segregated_call() takes exactly 8 positional arguments")

    monkeypatch.setattr(lean, "_channel", Refusing())
    with caplog.at_level(logging.WARNING, logger=_sync_unary.__name__):
        assert lean(pb.EchoRequest(message="fallback"), 10).message == "fallback"
    assert not _sync_unary.available
    assert "using grpc's calls" in caplog.text
