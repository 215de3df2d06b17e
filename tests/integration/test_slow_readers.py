"""Clients that stop reading (or sending) cannot starve the thread-pool server.

A sync handler that yields a response waits until the client's HTTP/2
flow-control window takes it, holding a worker thread. With grpcio alone, 16
unread server streams held every thread of a 16-worker pool and every other
call timed out. rpcframe caps the streams one connection may open below the
pool size and ends calls that wait on their client too long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import wait_until
from tests.servicers import ScriptedEcho

BIG = "x" * 65536  # one response message fills a stream's initial window
ENDLESS = 100_000  # more messages than any test reads


def _serve(config: rpcframe.ServerConfig) -> tuple[rpcframe.Server, str]:
    server = rpcframe.Server(config)
    server.add(ScriptedEcho())
    port = server.bind("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _own_connection(target: str) -> grpc.Channel:
    """A raw grpc channel on a connection of its own (grpc shares one between equal channels otherwise)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _expand(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(
        "/rpcframe.echo.v1.EchoService/Expand",
        request_serializer=pb.ExpandRequest.SerializeToString,
        response_deserializer=pb.EchoResponse.FromString,
    )


def _echo_works(target: str, timeout: float) -> None:
    with rpcframe.connect(target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        started = time.monotonic()
        assert stub.Echo(pb.EchoRequest(message="still here"), timeout=timeout).message == "still here"
        assert time.monotonic() - started < timeout


@pytest.mark.parametrize("streams", [16, 64])
def test_unread_server_streams_do_not_starve_the_default_server(streams: int) -> None:
    config = rpcframe.ServerConfig()  # the defaults are what is under test
    server, target = _serve(config)
    attacker = _own_connection(target)
    try:
        # Started at once; never iterated, so the client never reads a message.
        calls = [_expand(attacker)(pb.ExpandRequest(message=BIG, count=ENDLESS)) for _ in range(streams)]
        # 16 handlers blocked in a write took every thread of rpcframe's old 16-worker pool.
        wait_until(lambda: server.inflight >= 16, timeout=10)
        _echo_works(target, timeout=2.0)
        # Streams past the per-connection cap wait in the attacker's client, not on a server thread.
        held = min(streams, config.max_workers // 2)
        wait_until(lambda: server.inflight == held, timeout=10)
        _echo_works(target, timeout=2.0)
        assert server.inflight == held
        attacker.close()
        wait_until(lambda: server.inflight == 0, timeout=5)
        _echo_works(target, timeout=2.0)
        assert len(calls) == streams
    finally:
        attacker.close()
        server.stop(0)


def test_a_response_the_client_does_not_take_ends_the_call() -> None:
    server, target = _serve(rpcframe.ServerConfig(stream_write_timeout=0.3))
    channel = _own_connection(target)
    try:
        call = _expand(channel)(pb.ExpandRequest(message=BIG, count=ENDLESS), timeout=30)
        wait_until(lambda: server.inflight == 1, timeout=5)
        wait_until(lambda: server.inflight == 0, timeout=5)  # the watch freed the handler's thread
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:  # what the client had buffered, then the status
                pass
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stream_write_timeout" in info.value.details()
        _echo_works(target, timeout=2.0)
    finally:
        channel.close()
        server.stop(0)


def test_a_slow_reader_that_keeps_reading_is_not_cut() -> None:
    server, target = _serve(rpcframe.ServerConfig(stream_write_timeout=1.0))
    channel = _own_connection(target)
    try:
        read = 0
        for response in _expand(channel)(pb.ExpandRequest(message=BIG, count=40), timeout=30):
            read += 1
            if read % 10 == 0:
                time.sleep(0.3)  # a consumer that pauses, well under the timeout per message
            assert response.index == read - 1
        assert read == 40
    finally:
        channel.close()
        server.stop(0)


def _silent_requests(release: threading.Event) -> Iterator[pb.EchoRequest]:
    yield pb.EchoRequest(message="first")
    release.wait(10)  # then nothing, until the test ends


def _send_then_go_silent(channel: grpc.Channel, method: str, release: threading.Event) -> None:
    path, serialize = f"/rpcframe.echo.v1.EchoService/{method}", pb.EchoRequest.SerializeToString
    if method == "Collect":
        channel.stream_unary(path, request_serializer=serialize)(_silent_requests(release), timeout=30)
    else:
        list(channel.stream_stream(path, request_serializer=serialize)(_silent_requests(release), timeout=30))


@pytest.mark.parametrize("method", ["Collect", "Chat"])
def test_a_request_stream_that_goes_silent_ends_the_call(method: str) -> None:
    server, target = _serve(rpcframe.ServerConfig(stream_read_timeout=0.3))
    channel = _own_connection(target)
    release = threading.Event()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            _send_then_go_silent(channel, method, release)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "stream_read_timeout" in info.value.details()
        assert time.monotonic() - started < 5
        wait_until(lambda: server.inflight == 0, timeout=5)
        _echo_works(target, timeout=2.0)
    finally:
        release.set()
        channel.close()
        server.stop(0)


def test_stalled_streams_on_many_connections_are_freed_by_the_write_timeout() -> None:
    # 2 connections x 2 streams hold all 4 workers (2 per connection is the cap);
    # only the write timeout gives the pool back.
    config = rpcframe.ServerConfig(max_workers=4, stream_write_timeout=0.5)
    server, target = _serve(config)
    attackers = [_own_connection(target) for _ in range(2)]
    try:
        calls = [_expand(a)(pb.ExpandRequest(message=BIG, count=ENDLESS)) for a in attackers for _ in range(2)]
        wait_until(lambda: server.inflight == 4, timeout=5)
        _echo_works(target, timeout=5.0)
        wait_until(lambda: server.inflight == 0, timeout=5)
        assert len(calls) == 4
    finally:
        for a in attackers:
            a.close()
        server.stop(0)
