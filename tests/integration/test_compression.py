"""Compression per channel, method and call, with a size threshold, and server responses; both fronts.

What goes on the wire is measured, not inferred: every test connects through
:class:`WireCounter`, a TCP relay on 127.0.0.1 that counts the bytes each way.
The payload is JSON-like text that deflate shrinks several times over, so a
compressed message is far smaller than its serialized size and an
uncompressed one never is.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

import rpcframe
import rpcframe.aio
from examples.echo import AioEchoServicer, EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.errors import ConfigError


class WireCounter:
    """A TCP relay to ``127.0.0.1:upstream`` counting the bytes sent each way (``up``, ``down``).

    A byte is counted before it is passed on, so once a call has completed
    every byte of it is in the counts.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.up = 0
        self.down = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target(self) -> str:
        """The address clients dial."""
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._sockets.append(client)
                if self._closed:
                    client.close()
                    return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.append(server)
                if self._closed:
                    server.close()
                    return
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def counts(self) -> tuple[int, int]:
        """Bytes relayed so far: (client to server, server to client)."""
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        """Stop relaying and close every socket."""
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def payload(size: int) -> str:
    """JSON-like text of about ``size`` bytes (records with repeated keys, varying values)."""
    records, length, i = [], 2, 0
    while length < size:
        record = json.dumps({"id": i, "name": f"user-{i:05d}", "active": i % 3 == 0, "score": i * 7 % 101})
        records.append(record)
        length += len(record) + 2
        i += 1
    return ("[" + ", ".join(records) + "]")[:size]


def wire_delta(wire: WireCounter, call: Callable[[], Any]) -> tuple[int, int]:
    """Bytes each way on ``wire`` while ``call`` ran (after the connection was set up)."""
    up, down = wire.counts()
    call()
    up2, down2 = wire.counts()
    return up2 - up, down2 - down


BIG = 8192  # above the default threshold (1024), compresses to well under half
SMALL = 600  # below it: as compressible, but must go uncompressed


def _sync_server(config: rpcframe.ServerConfig) -> tuple[rpcframe.Server, int]:
    server = rpcframe.Server(config)
    server.add(EchoServicer())
    port = server.bind("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def serve() -> Iterator[Callable[..., WireCounter]]:
    """Start a sync echo server (with ``ServerConfig`` fields given) behind a WireCounter."""
    started: list[tuple[rpcframe.Server, WireCounter]] = []

    def start(**fields: Any) -> WireCounter:
        server, port = _sync_server(rpcframe.ServerConfig(grace_period=0.5, **fields))
        wire = WireCounter(port)
        started.append((server, wire))
        return wire

    yield start
    for server, wire in started:
        wire.close()
        server.stop(0)


def _channel_config(**fields: Any) -> rpcframe.ChannelConfig:
    return rpcframe.ChannelConfig(health_check=False, **fields)


def echo_sync(wire: WireCounter, config: rpcframe.ChannelConfig, message: str, **kw: Any) -> tuple[int, int]:
    """Bytes each way of one Echo call (sync front), after a warm-up call set up the connection."""
    with rpcframe.connect(wire.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        stub.Echo(pb.EchoRequest(message="warm-up"), timeout=5)
        answers: list[str] = []
        request = pb.EchoRequest(message=message)
        delta = wire_delta(wire, lambda: answers.append(stub.Echo(request, timeout=5, **kw).message))
        assert answers == [message]
        return delta


def test_config_rejects_unknown_algorithms() -> None:
    with pytest.raises(ConfigError, match="compression"):
        rpcframe.ChannelConfig(compression="zstd")
    with pytest.raises(ConfigError, match="compression_threshold"):
        rpcframe.ChannelConfig(compression="gzip", compression_threshold=-1)
    with pytest.raises(ConfigError, match="compression"):
        rpcframe.MethodConfig(compression="br")
    with pytest.raises(ConfigError, match="compression"):
        rpcframe.ServerConfig(compression="lz4")


def test_default_sends_uncompressed(serve: Callable[..., WireCounter]) -> None:
    wire = serve()
    up, down = echo_sync(wire, _channel_config(), payload(BIG))
    assert up > BIG
    assert down > BIG


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_channel_compression_above_threshold(serve: Callable[..., WireCounter], algorithm: str) -> None:
    wire = serve()
    up, down = echo_sync(wire, _channel_config(compression=algorithm), payload(BIG))
    assert up < BIG // 2, f"request of {BIG} B took {up} B on the wire"
    assert down > BIG  # the server was not asked to compress its responses


def test_below_threshold_goes_uncompressed(serve: Callable[..., WireCounter]) -> None:
    wire = serve()
    up, _ = echo_sync(wire, _channel_config(compression="gzip"), payload(SMALL))
    assert up > SMALL
    up, _ = echo_sync(wire, _channel_config(compression="gzip", compression_threshold=0), payload(SMALL))
    assert up < SMALL  # the same request is compressed once the threshold allows it


def test_method_config_overrides_channel(serve: Callable[..., WireCounter]) -> None:
    wire = serve()
    off = {"rpcframe.echo.v1.EchoService/Echo": rpcframe.MethodConfig(compression="none")}
    up, _ = echo_sync(wire, _channel_config(compression="gzip", methods=off), payload(BIG))
    assert up > BIG
    on = {"rpcframe.echo.v1.EchoService": rpcframe.MethodConfig(compression="deflate")}
    up, _ = echo_sync(wire, _channel_config(methods=on), payload(BIG))
    assert up < BIG // 2


def test_call_argument_wins(serve: Callable[..., WireCounter]) -> None:
    wire = serve()
    up, _ = echo_sync(wire, _channel_config(), payload(BIG), compression=grpc.Compression.Gzip)
    assert up < BIG // 2
    config = _channel_config(compression="gzip")
    up, _ = echo_sync(wire, config, payload(BIG), compression=grpc.Compression.NoCompression)
    assert up > BIG
    # Under the threshold too: the caller asked for it.
    up, _ = echo_sync(wire, config, payload(SMALL), compression=grpc.Compression.Gzip)
    assert up < SMALL


def test_server_compresses_responses_above_threshold(serve: Callable[..., WireCounter]) -> None:
    wire = serve(compression="gzip")
    _, down = echo_sync(wire, _channel_config(), payload(BIG))
    assert down < BIG // 2
    _, down = echo_sync(wire, _channel_config(), payload(SMALL))
    assert down > SMALL


def test_server_streamed_messages_follow_the_threshold(serve: Callable[..., WireCounter]) -> None:
    wire = serve(compression="deflate")
    with rpcframe.connect(wire.target, _channel_config()) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert len(list(stub.Expand(pb.ExpandRequest(message="warm-up", count=1), timeout=5))) == 1
        answers: list[int] = []
        big = pb.ExpandRequest(message=payload(BIG), count=4)
        _, down = wire_delta(wire, lambda: answers.append(len(list(stub.Expand(big, timeout=5)))))
        assert down < 4 * BIG // 2
        small = pb.ExpandRequest(message=payload(SMALL), count=4)
        _, down = wire_delta(wire, lambda: answers.append(len(list(stub.Expand(small, timeout=5)))))
        assert down > 4 * SMALL
        assert answers == [4, 4]


def test_request_streams_are_compressed_whole(serve: Callable[..., WireCounter]) -> None:
    # No size is known before a stream starts: every message of it is compressed, small ones too.
    # (Through grpcio's stream-unary future(), which alone drops compression=: rpcframe sends it as metadata.)
    wire = serve()
    with rpcframe.connect(wire.target, _channel_config(compression="gzip")) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Collect(iter([pb.EchoRequest(message="warm-up")]), timeout=5).count == 1
        messages = [pb.EchoRequest(message=payload(SMALL)) for _ in range(4)]
        counts: list[int] = []
        up, _ = wire_delta(wire, lambda: counts.append(stub.Collect(iter(messages), timeout=5).count))
        assert counts == [4]
        assert up < 4 * SMALL // 2


# asyncio front: an asyncio server, an asyncio client, the same wire counts.


async def _aio_delta(wire: WireCounter, config: rpcframe.ChannelConfig, request: Any, **kw: Any) -> tuple[int, int]:
    """Bytes each way of one Echo or Expand call (asyncio front) after a warm-up call."""
    async with rpcframe.aio.connect(wire.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        await stub.Echo(pb.EchoRequest(message="warm-up"), timeout=5)
        up, down = wire.counts()
        if isinstance(request, pb.EchoRequest):
            assert (await stub.Echo(request, timeout=5, **kw)).message == request.message
        else:
            assert len([r async for r in stub.Expand(request, timeout=5, **kw)]) == request.count
        up2, down2 = wire.counts()
        return up2 - up, down2 - down


@pytest.fixture
async def aio_serve() -> Any:
    """Start an asyncio echo server (with ``ServerConfig`` fields given) behind a WireCounter."""
    started: list[tuple[rpcframe.aio.Server, WireCounter]] = []

    async def start(**fields: Any) -> WireCounter:
        server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=0.5, **fields))
        server.add(AioEchoServicer())
        port = server.bind("127.0.0.1:0")
        await server.start()
        wire = WireCounter(port)
        started.append((server, wire))
        return wire

    yield start
    for server, wire in started:
        wire.close()
        await server.stop(0)


async def test_aio_client_compression(aio_serve: Any) -> None:
    wire = await aio_serve()
    config = _channel_config(compression="gzip")
    up, _ = await _aio_delta(wire, config, pb.EchoRequest(message=payload(BIG)))
    assert up < BIG // 2
    up, _ = await _aio_delta(wire, config, pb.EchoRequest(message=payload(SMALL)))
    assert up > SMALL
    up, _ = await _aio_delta(wire, _channel_config(), pb.EchoRequest(message=payload(SMALL)),
                             compression=grpc.Compression.Deflate)  # fmt: skip
    assert up < SMALL


async def test_aio_request_streams_are_compressed(aio_serve: Any) -> None:
    wire = await aio_serve()
    messages = [pb.EchoRequest(message=payload(SMALL)) for _ in range(4)]
    async with rpcframe.aio.connect(wire.target, _channel_config(compression="deflate")) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert (await stub.Collect(iter([pb.EchoRequest(message="warm-up")]), timeout=5)).count == 1
        up = wire.counts()[0]
        assert (await stub.Collect(iter(messages), timeout=5)).count == 4
        assert wire.counts()[0] - up < 4 * SMALL // 2


async def test_aio_server_response_threshold(aio_serve: Any) -> None:
    wire = await aio_serve(compression="gzip")
    config = _channel_config()
    _, down = await _aio_delta(wire, config, pb.EchoRequest(message=payload(BIG)))
    assert down < BIG // 2
    _, down = await _aio_delta(wire, config, pb.EchoRequest(message=payload(SMALL)))
    assert down > SMALL
    _, down = await _aio_delta(wire, config, pb.ExpandRequest(message=payload(BIG), count=3))
    assert down < 3 * BIG // 2
    _, down = await _aio_delta(wire, config, pb.ExpandRequest(message=payload(SMALL), count=3))
    assert down > 3 * SMALL
    # The same small messages are compressed once the threshold allows it: the threshold did the above.
    wire = await aio_serve(compression="gzip", compression_threshold=0)
    _, down = await _aio_delta(wire, config, pb.EchoRequest(message=payload(SMALL)))
    assert down < SMALL
    _, down = await _aio_delta(wire, config, pb.ExpandRequest(message=payload(SMALL), count=3))
    assert down < 3 * SMALL
