"""Hostile HTTP/2 frames from a raw client: every call still gets an answer.

A unary method's request must arrive as one whole gRPC message. When the
stream ends without one (no DATA, half a length prefix, or a prefix claiming
more bytes than were sent), grpc.aio's own server never answers: the call
stays open while the connection lives, holding memory, and a client waiting
for it keeps the server's stop() waiting out its grace period. grpc's
thread-pool server answers UNIMPLEMENTED ("requires exactly one request
message"), which reads as "no such method". Both rpcframe servers answer
INVALID_ARGUMENT at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio
import h2.events
import pytest

import rpcframe
import rpcframe.aio
from examples.echo import AioEchoServicer, EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import Running, eventually
from tests.h2raw import RawConnection, grpc_frame, open_connection, read_answer, send_request

ECHO = "/rpcframe.echo.v1.EchoService/Echo"
EXPAND = "/rpcframe.echo.v1.EchoService/Expand"
CHECK = "/grpc.health.v1.Health/Check"

TRUNCATED = grpc_frame(b"\x0a\x08abcdefgh", declared=100)  # the prefix says 100 bytes, 10 follow
BODIES = {
    "truncated": TRUNCATED,
    "no-message": b"",  # HEADERS with END_STREAM, no DATA
    "half-prefix": b"\x00\x00",
}
ANSWER_WITHIN = 5.0


def _hostile_call(port: int, path: str, body: bytes) -> tuple[int | None, int | None]:
    """One request on a fresh connection: (grpc-status, RST_STREAM code) seen within ANSWER_WITHIN s."""
    conn = open_connection(port)
    try:
        answer = read_answer(conn, send_request(conn, path, body), ANSWER_WITHIN)
        return answer.grpc_status, answer.reset_code
    finally:
        conn.close()


def _close_when_answered(conn: RawConnection, within: float) -> bool:
    """Act like a grpc client during a server's shutdown: read until GOAWAY, then close if nothing is pending.

    A grpc client keeps its connection while it still waits for a call's
    answer; an unanswered stream therefore keeps the server's stop() waiting.
    Returns whether the connection was closed.
    """
    deadline = time.monotonic() + within
    while not conn.goaway_received and time.monotonic() < deadline:
        conn.pump(deadline - time.monotonic())
    if all(a.grpc_status is not None or a.reset_code is not None for a in conn.answers.values()):
        conn.close()
        return True
    return False


async def _echo_works(target: str) -> None:
    async with rpcframe.aio.connect(target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert (await stub.Echo(pb.EchoRequest(message="alive"), timeout=5)).message == "alive"


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
@pytest.mark.parametrize("path", [ECHO, EXPAND, CHECK], ids=["unary", "server-stream", "health-check"])
async def test_request_without_a_whole_message_is_invalid_argument_aio(
    aio_server: Running, path: str, body: bytes
) -> None:
    status, reset = await asyncio.to_thread(_hostile_call, aio_server.server.ports[0], path, body)
    assert (status, reset) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], None)
    await _echo_works(aio_server.target)


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
@pytest.mark.parametrize("path", [ECHO, EXPAND], ids=["unary", "server-stream"])
def test_request_without_a_whole_message_is_invalid_argument_sync(sync_server: Running, path: str, body: bytes) -> None:
    status, reset = _hostile_call(sync_server.server.ports[0], path, body)
    assert (status, reset) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], None)
    with rpcframe.connect(sync_server.target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(pb.EchoRequest(message="ok"), timeout=5).message == "ok"
        assert [r.index for r in stub.Expand(pb.ExpandRequest(message="t", count=2), timeout=5)] == [0, 1]


def test_raw_grpc_sync_answers_a_truncated_call_unimplemented() -> None:
    """grpc's thread-pool server alone, which rpcframe's differs from: a failure here means grpcio changed."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        status, reset = _hostile_call(port, ECHO, TRUNCATED)
        assert (status, reset) == (grpc.StatusCode.UNIMPLEMENTED.value[0], None)
    finally:
        server.stop(0)


async def test_truncated_streams_hold_nothing_while_the_connection_stays_open(aio_server: Running) -> None:
    def attack() -> RawConnection:
        conn = open_connection(aio_server.server.ports[0])
        streams = [send_request(conn, ECHO, TRUNCATED) for _ in range(20)]
        for stream in streams:
            read_answer(conn, stream, ANSWER_WITHIN)
        return conn

    before = len(asyncio.all_tasks())
    conn = await asyncio.to_thread(attack)
    try:
        assert all(a.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0] for a in conn.answers.values())

        async def settled() -> bool:  # grpc.aio keeps one task per call until the call is over
            return len(asyncio.all_tasks()) <= before

        await eventually(settled, within=ANSWER_WITHIN)
    finally:
        conn.close()


async def test_stop_is_prompt_with_a_truncated_stream_open() -> None:
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=5.0))
    server.add(AioEchoServicer())
    port = server.bind("127.0.0.1:0")
    await server.start()
    conn = await asyncio.to_thread(open_connection, port)
    try:
        stream = await asyncio.to_thread(send_request, conn, ECHO, TRUNCATED)
        # Answered before stop(): an answer in the same read as the GOAWAY would be lost to h2.
        answer = await asyncio.to_thread(read_answer, conn, stream, ANSWER_WITHIN)
        assert answer.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        client = asyncio.ensure_future(asyncio.to_thread(_close_when_answered, conn, 8.0))
        started = time.monotonic()
        await server.stop()
        elapsed = time.monotonic() - started
        assert await client, "a call was left unanswered, so the client kept its connection"
        assert elapsed < 2.0, f"stop() took {elapsed:.1f} s"
    finally:
        conn.close()
        await server.stop(0)


async def test_raw_grpc_aio_still_leaves_a_truncated_call_unanswered() -> None:
    """grpc.aio's own behaviour, which rpcframe works around: XPASS here means grpcio fixed it."""
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(AioEchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn = await asyncio.to_thread(open_connection, port)
    try:
        stream = await asyncio.to_thread(send_request, conn, ECHO, TRUNCATED)
        answer = await asyncio.to_thread(read_answer, conn, stream, 1.0)
        assert not answer.ended, "grpc.aio answers truncated unary requests now: rpcframe's workaround can go"
    finally:
        conn.close()
        await server.stop(0)


@pytest.mark.parametrize("front", ["sync", "aio"])
async def test_an_idle_connection_that_ignores_goaway_cannot_hold_stop(front: str) -> None:
    """grpc waits for every connection to close after GOAWAY: an idle raw client held stop() for the whole grace."""
    config = rpcframe.ServerConfig(grace_period=10.0, drain_delay=0)
    server: Any = rpcframe.Server(config) if front == "sync" else rpcframe.aio.Server(config)
    server.add(AioEchoServicer() if front == "aio" else EchoServicer())
    port = server.bind("127.0.0.1:0")
    await _maybe(server.start())
    conns = [await asyncio.to_thread(open_connection, port) for _ in range(3)]
    try:
        started = time.monotonic()
        await (server.stop() if front == "aio" else asyncio.to_thread(server.stop))
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"stop() took {elapsed:.1f} s with idle connections open"
    finally:
        for conn in conns:
            conn.close()
        await _maybe(server.stop(0))


async def _maybe(result: Any) -> None:
    if asyncio.iscoroutine(result):
        await result


class _UnreadConnection(RawConnection):
    """A raw connection that never acknowledges DATA: the server's flow-control window stays shut."""

    def _record(self, event: h2.events.Event) -> None:
        if not isinstance(event, h2.events.DataReceived):
            super()._record(event)


CHAT = "/rpcframe.echo.v1.EchoService/Chat"


def _send(conn: RawConnection, stream: int, data: bytes, *, end_stream: bool) -> None:
    """One DATA frame, once the server's flow-control window has room for it."""
    deadline = time.monotonic() + ANSWER_WITHIN
    while conn.h2.local_flow_control_window(stream) < len(data) and time.monotonic() < deadline:
        conn.pump(deadline - time.monotonic())  # the server's WINDOW_UPDATE for what it read
    conn.h2.send_data(stream, data, end_stream=end_stream)
    conn.flush()


def _open_unread_streams(port: int, path: str, count: int) -> RawConnection:
    """``count`` response streams on one connection, each sent more than its window, none read.

    Expand: one request for 100 MB of responses; Chat: 10 requests of 8 KB,
    each echoed. The connection stays open until ``close()``.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN)
    conn = _UnreadConnection(sock, f"127.0.0.1:{port}")
    conn.h2.initiate_connection()
    if path == EXPAND:
        bodies = [grpc_frame(pb.ExpandRequest(message="x" * 1000, count=100_000).SerializeToString())]
    else:
        bodies = [grpc_frame(pb.EchoRequest(message="x" * 8000).SerializeToString())] * 10
    streams = [send_request(conn, path, b"", end_stream=False) for _ in range(count)]
    for stream in streams:
        for i, body in enumerate(bodies):
            _send(conn, stream, body, end_stream=i == len(bodies) - 1)
    deadline = time.monotonic() + ANSWER_WITHIN  # until every stream has its headers: its handler runs
    while not all(conn.answers[s].headers for s in streams) and time.monotonic() < deadline:
        conn.pump(deadline - time.monotonic())
    assert all(conn.answers[s].headers for s in streams), "the server did not start every stream"
    return conn


@pytest.mark.parametrize("path", [EXPAND, CHAT], ids=["server-stream", "bidi"])
async def test_a_client_leaving_unread_streams_is_not_an_error(
    aio_server: Running, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A client that goes away with server streams blocked on flow control: their writes fail, quietly."""
    caplog.set_level(logging.WARNING)
    for _ in range(3):  # a write failing before grpc saw the client leave is a race: give it several chances
        conn = await asyncio.to_thread(_open_unread_streams, aio_server.server.ports[0], path, 16)
        conn.close()

        async def ended() -> bool:
            return aio_server.server.inflight == 0

        await eventually(ended, within=ANSWER_WITHIN)
    await _echo_works(aio_server.target)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(f"{r.name}: {r.getMessage()}" for r in errors)
