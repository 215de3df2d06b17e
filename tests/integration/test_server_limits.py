"""ServerConfig's connection and stream limits take effect on a real server.

Each test sets one limit (low where it is a time) and shows grpc applies it:
per-connection stream caps, the header size cap, idle and aged connections
closed, a silent connection cut at the handshake, the connection cap. And
the memory that many closed connections leave behind goes back to the OS.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.client._sync import close_unwatched
from rpcframe.server import _heap
from tests.conftest import eventually, wait_until
from tests.servicers import AioScriptedEcho, ScriptedEcho


def _serve(config: rpcframe.ServerConfig) -> tuple[rpcframe.Server, ScriptedEcho, str]:
    servicer = ScriptedEcho()
    server = rpcframe.Server(config)
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    server.start()
    return server, servicer, f"127.0.0.1:{port}"


def _raw_channel(target: str) -> grpc.Channel:
    """A raw grpc channel with a connection of its own and no health Watch (which would keep it busy)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def _raw_echo(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        "/rpcframe.echo.v1.EchoService/Echo",
        request_serializer=pb.EchoRequest.SerializeToString,
        response_deserializer=pb.EchoResponse.FromString,
    )


@pytest.fixture
def served() -> Iterator[list[tuple[rpcframe.Server, ScriptedEcho]]]:
    """Servers a test starts; released and stopped at its end."""
    started: list[tuple[rpcframe.Server, ScriptedEcho]] = []
    yield started
    for server, servicer in started:
        servicer.release.set()
        server.stop(0)


def test_sync_server_caps_streams_per_connection(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    config = rpcframe.ServerConfig(max_workers=8)  # default cap: half the pool, 4 streams per connection
    server, servicer, target = _serve(config)
    served.append((server, servicer))
    channel = _raw_channel(target)
    try:
        blocked = [_raw_echo(channel).future(pb.EchoRequest(message="block"), timeout=20) for _ in range(6)]
        wait_until(lambda: server.inflight == 4, timeout=5)
        # The 5th and 6th wait in the client; another connection is served beside them.
        with rpcframe.connect(target) as other:
            assert other.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="hi"), timeout=2).message
        assert server.inflight == 4
        servicer.release.set()
        assert [f.result(timeout=10).message for f in blocked] == ["block"] * 6
    finally:
        channel.close()


def test_sync_server_caps_calls_and_counts_them_down(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    """max_concurrent_rpcs: grpc counts a call until its task says it is done (the handler pool's callback)."""
    server, servicer, target = _serve(rpcframe.ServerConfig(max_workers=8, max_concurrent_rpcs=2))
    served.append((server, servicer))
    channel = _raw_channel(target)
    try:
        blocked = [_raw_echo(channel).future(pb.EchoRequest(message="block"), timeout=20) for _ in range(2)]
        wait_until(lambda: server.inflight == 2, timeout=5)
        with pytest.raises(grpc.RpcError) as refused:
            _raw_echo(channel)(pb.EchoRequest(message="third"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        servicer.release.set()
        assert [f.result(timeout=10).message for f in blocked] == ["block"] * 2
        # Counted down: more calls, one after another, than the cap.
        for n in range(10):
            assert _raw_echo(channel)(pb.EchoRequest(message=f"m{n}"), timeout=5).message == f"m{n}"
    finally:
        channel.close()


async def test_aio_server_caps_streams_per_connection_at_100() -> None:
    servicer = AioScriptedEcho()
    server = rpcframe.aio.Server(rpcframe.ServerConfig())  # the default: Envoy's 100
    server.add(servicer)
    target = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    await server.start()
    # A raw channel: an rpcframe channel's health Watch would take one of the 100 streams.
    channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        echo = channel.unary_unary(
            "/rpcframe.echo.v1.EchoService/Echo",
            request_serializer=pb.EchoRequest.SerializeToString,
            response_deserializer=pb.EchoResponse.FromString,
        )
        calls = [asyncio.ensure_future(echo(pb.EchoRequest(message="block"), timeout=20)) for _ in range(101)]
        await eventually(lambda: _true(server.inflight == 100))
        async with rpcframe.aio.connect(target) as other:
            other_echo = other.stub(echo_pb2_grpc.EchoServiceStub).Echo
            assert (await other_echo(pb.EchoRequest(message="hi"), timeout=2)).message == "hi"
        assert server.inflight == 100  # the 101st still waits in the client
        servicer.release.set()
        assert [r.message for r in await asyncio.gather(*calls)] == ["block"] * 101
    finally:
        servicer.release.set()
        await channel.close()
        await server.stop(0)


async def _true(value: bool) -> bool:
    return value


def test_header_size_cap_is_exact_and_clean(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    server, servicer, target = _serve(rpcframe.ServerConfig())
    served.append((server, servicer))
    with rpcframe.connect(target) as channel:
        echo = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo
        # grpc alone refuses headers between 8 and 16 KiB at random; under the cap all pass.
        for _ in range(20):
            assert echo(pb.EchoRequest(message="ok"), metadata=(("big-header", "a" * 12_000),), timeout=5).message
        with pytest.raises(rpcframe.ResourceExhausted) as info:
            echo(pb.EchoRequest(message="ok"), metadata=(("big-header", "a" * 20_000),), timeout=5)
        assert "metadata size" in info.value.details()
        assert echo(pb.EchoRequest(message="still here"), timeout=5).message == "still here"


def test_idle_connection_is_closed(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    server, servicer, target = _serve(rpcframe.ServerConfig(max_connection_idle=0.3))
    served.append((server, servicer))
    channel = _raw_channel(target)
    states: list[grpc.ChannelConnectivity] = []
    try:
        assert _raw_echo(channel)(pb.EchoRequest(message="x"), timeout=5).message == "x"
        channel.subscribe(states.append)
        wait_until(lambda: grpc.ChannelConnectivity.IDLE in states, timeout=5)  # the server's GOAWAY
        assert grpc.ChannelConnectivity.READY in states
    finally:
        channel.unsubscribe(states.append)
        close_unwatched(channel)  # closed under grpc's polling thread, that thread would raise


def test_aged_connection_cuts_a_stuck_call(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    config = rpcframe.ServerConfig(max_connection_age=0.3, max_connection_age_grace=0.3)
    server, servicer, target = _serve(config)
    served.append((server, servicer))
    channel = _raw_channel(target)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            _raw_echo(channel)(pb.EchoRequest(message="block"), timeout=20)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5
    finally:
        channel.close()


def test_silent_connection_is_cut_at_the_handshake(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    server, servicer, target = _serve(rpcframe.ServerConfig(handshake_timeout=0.3))
    served.append((server, servicer))
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        started = time.monotonic()
        while sock.recv(4096):  # the server's SETTINGS, then the close
            pass
        assert time.monotonic() - started < 3


def test_connection_cap_refuses_the_next_connection(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    server, servicer, target = _serve(rpcframe.ServerConfig(max_connections=1))
    served.append((server, servicer))
    first, second = _raw_channel(target), _raw_channel(target)
    try:
        assert _raw_echo(first)(pb.EchoRequest(message="one"), timeout=5).message == "one"
        with pytest.raises(grpc.RpcError) as info:
            _raw_echo(second)(pb.EchoRequest(message="two"), timeout=2)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert _raw_echo(first)(pb.EchoRequest(message="one again"), timeout=5).message == "one again"
    finally:
        first.close()
        second.close()


def test_defaults_keep_a_busy_connection_open(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    # Limits must not cut a well-behaved client: a blocked call on a default server stays up.
    server, servicer, target = _serve(rpcframe.ServerConfig())
    served.append((server, servicer))
    channel = _raw_channel(target)
    try:
        call = _raw_echo(channel).future(pb.EchoRequest(message="block"), timeout=20)
        assert servicer.started.wait(5)
        assert not call.done()
        threading.Timer(0.5, servicer.release.set).start()
        assert call.result(timeout=10).message == "block"
    finally:
        channel.close()


def test_raw_grpc_option_replaces_rpcframes_own(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    # grpc keeps the first of two equal keys: an appended override alone would be ignored.
    config = rpcframe.ServerConfig(grpc_options=(("grpc.max_concurrent_streams", 2),))
    server, servicer, target = _serve(config)
    served.append((server, servicer))
    channel = _raw_channel(target)
    try:
        blocked = [_raw_echo(channel).future(pb.EchoRequest(message="block"), timeout=20) for _ in range(3)]
        wait_until(lambda: server.inflight == 2, timeout=5)
        with rpcframe.connect(target) as other:  # proves the third waits in the client, not in a slow server
            assert other.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="hi"), timeout=2).message
        assert server.inflight == 2
        servicer.release.set()
        assert [f.result(timeout=10).message for f in blocked] == ["block"] * 3
    finally:
        channel.close()


def _accepted(port: int) -> int:
    """Sockets this process holds for connections accepted on ``port`` (the server's side).

    Counted by inode rather than by the number of open fds, which other
    tests' channels, still closing in the background, change meanwhile.
    """
    inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                local_port, state = int(fields[1].rsplit(":", 1)[1], 16), fields[3]
                if local_port == port and state != "0A":  # not the listening socket
                    inodes.add(fields[9])
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed since the listing
        held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_heap.TRIMMER is None, reason="malloc_trim and mallinfo2 are glibc's (>= 2.33)")
def test_memory_of_closed_connections_goes_back_to_the_os(served: list[tuple[rpcframe.Server, ScriptedEcho]]) -> None:
    """glibc keeps what 1000 closed connections freed (~12 MiB) unless the server trims its heap."""
    trimmer = _heap.TRIMMER
    assert trimmer is not None
    server, servicer, target = _serve(rpcframe.ServerConfig())
    served.append((server, servicer))
    host, port = target.rsplit(":", 1)
    trims = trimmer.trims
    socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(1000)]
    try:
        wait_until(lambda: _accepted(int(port)) == 1000, timeout=10)  # the server accepted them all
        peak = _rss()
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: _accepted(int(port)) == 0, timeout=10)  # grpc closed its side
    wait_until(lambda: trimmer.trims > trims, timeout=5)
    assert _rss() < peak - (2 << 20)
    with rpcframe.connect(target) as channel:
        assert channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="hi"), timeout=5).message


async def test_servers_hold_the_heap_trimmer_while_they_run() -> None:
    if _heap.TRIMMER is None:
        pytest.skip("malloc_trim and mallinfo2 are glibc's (>= 2.33)")
    holders = _heap.TRIMMER._holders
    sync_server = rpcframe.Server(rpcframe.ServerConfig())
    aio_server = rpcframe.aio.Server(rpcframe.ServerConfig())
    for server in (sync_server, aio_server):
        server.add(ScriptedEcho() if server is sync_server else AioScriptedEcho())
        server.bind("127.0.0.1:0")
    sync_server.start()
    await aio_server.start()
    assert _heap.TRIMMER._holders == holders + 2
    await asyncio.to_thread(sync_server.stop, 0)
    await aio_server.stop(0)
    await aio_server.stop(0)  # a second stop releases nothing more
    assert _heap.TRIMMER._holders == holders
