"""Bad input gets a precise status and the server keeps serving."""

from __future__ import annotations

import socket

import grpc
import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import Running
from tests.servicers import ScriptedEcho


def _still_serving(target: str) -> None:
    with rpcframe.connect(target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(pb.EchoRequest(message="alive")).message == "alive"


def test_unknown_method_is_unimplemented(sync_server: Running) -> None:
    with rpcframe.connect(sync_server.target) as channel:
        nope = channel.unary_unary("/rpcframe.echo.v1.EchoService/Nope")
        with pytest.raises(rpcframe.Unimplemented):
            nope(b"")
        other = channel.unary_unary("/no.such.Service/Echo")
        with pytest.raises(rpcframe.Unimplemented):
            other(b"")
    _still_serving(sync_server.target)


async def test_unknown_method_is_unimplemented_aio(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target) as channel:
        nope = channel.unary_unary("/rpcframe.echo.v1.EchoService/Nope")
        with pytest.raises(rpcframe.Unimplemented):
            await nope(b"")
        echo = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo
        assert (await echo(pb.EchoRequest(message="alive"))).message == "alive"


def test_invalid_message_bytes_is_an_error_and_server_survives(sync_server: Running) -> None:
    with rpcframe.connect(sync_server.target) as channel:
        raw = channel.unary_unary("/rpcframe.echo.v1.EchoService/Echo")
        # Field 1 declared as a length-delimited string of 100 bytes, but cut short.
        with pytest.raises(rpcframe.RpcError) as info:
            raw(b"\x0a\x64abc")
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "rpcframe.echo.v1.EchoRequest" in info.value.details()
    _still_serving(sync_server.target)


async def test_invalid_message_bytes_aio(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target) as channel:
        raw = channel.unary_unary("/rpcframe.echo.v1.EchoService/Echo")
        with pytest.raises(rpcframe.RpcError) as info:
            await raw(b"\x0a\x64abc")
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "rpcframe.echo.v1.EchoRequest" in info.value.details()
        echo = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo
        assert (await echo(pb.EchoRequest(message="alive"))).message == "alive"


def test_oversized_request_is_resource_exhausted() -> None:
    server = rpcframe.Server(rpcframe.ServerConfig(max_receive_message_length=1024))
    server.add(ScriptedEcho())
    port = server.bind("127.0.0.1:0")
    with server, rpcframe.connect(f"127.0.0.1:{port}") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(rpcframe.ResourceExhausted):
            stub.Echo(pb.EchoRequest(message="x" * 4096))
        assert stub.Echo(pb.EchoRequest(message="small")).message == "small"


def test_oversized_response_is_resource_exhausted_on_client(sync_server: Running) -> None:
    config = rpcframe.ChannelConfig(max_receive_message_length=1024)
    with rpcframe.connect(sync_server.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(rpcframe.ResourceExhausted):
            stub.Echo(pb.EchoRequest(message="y" * 4096))
    _still_serving(sync_server.target)


def test_client_refuses_to_send_oversized_request(sync_server: Running) -> None:
    config = rpcframe.ChannelConfig(max_send_message_length=1024)
    with rpcframe.connect(sync_server.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(rpcframe.ResourceExhausted):
            stub.Echo(pb.EchoRequest(message="z" * 4096))
    assert sync_server.servicer.calls == 0


def test_unreachable_target_is_unavailable() -> None:
    # Bind and release a port so nothing listens there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with rpcframe.connect(f"127.0.0.1:{port}") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(rpcframe.Unavailable):
            stub.Echo(pb.EchoRequest(message="x"), timeout=5)


GOOD = pb.EchoRequest(message="ok").SerializeToString()
JUNK = b"\x0a\x64abc"  # field 1 declared 100 bytes long, cut short


def _send_junk(channel: rpcframe.Channel, method: str) -> None:
    path = f"/rpcframe.echo.v1.EchoService/{method}"
    if method == "Collect":
        channel.stream_unary(path)(iter([GOOD, JUNK, GOOD]), timeout=5)
    else:
        list(channel.stream_stream(path)(iter([GOOD, JUNK, GOOD]), timeout=5))


async def _send_junk_aio(channel: rpcframe.aio.Channel, method: str) -> None:
    path = f"/rpcframe.echo.v1.EchoService/{method}"
    if method == "Collect":
        await channel.stream_unary(path)(iter([GOOD, JUNK, GOOD]), timeout=5)
    else:
        async for _ in channel.stream_stream(path)(iter([GOOD, JUNK, GOOD]), timeout=5):
            pass


@pytest.mark.parametrize("method", ["Collect", "Chat"])
def test_junk_on_a_request_stream_is_invalid_argument(
    sync_server: Running, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    with rpcframe.connect(sync_server.target) as channel:
        with pytest.raises(rpcframe.RpcError) as info:
            _send_junk(channel, method)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "rpcframe.echo.v1.EchoRequest" in info.value.details()
    assert not [r for r in caplog.records if r.name == "rpcframe.server" and r.levelname == "ERROR"]
    _still_serving(sync_server.target)


@pytest.mark.parametrize("method", ["Collect", "Chat"])
async def test_junk_on_a_request_stream_is_invalid_argument_aio(
    aio_server: Running, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with rpcframe.aio.connect(aio_server.target) as channel:
        with pytest.raises(rpcframe.RpcError) as info:
            await _send_junk_aio(channel, method)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "rpcframe.echo.v1.EchoRequest" in info.value.details()
        echo = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo
        assert (await echo(pb.EchoRequest(message="alive"))).message == "alive"
    assert not [r for r in caplog.records if r.name == "rpcframe.server" and r.levelname == "ERROR"]
