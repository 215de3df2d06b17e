"""Hostile clients: raw TCP and raw HTTP/2 attacks on a gRPC server, each bounded in time.

Each attack connects to ``HOST:PORT`` (BenchService, ``protos/rpcframe/bench``),
misbehaves, watches what the server sends back for at most
:data:`ANSWER_WITHIN` seconds and returns an :class:`Attack`: whether the
server answered, what the attacker saw, and the sockets still open. Idle
connections and unread streams only press on the server while they stay
open, so the caller checks the server first and then calls
:meth:`Attack.close` (the attacker disconnecting).

HTTP/2 goes through the tests' raw client (``tests/h2raw.py``, the ``h2``
package). Unread streams use a variant of it that never acknowledges data
(the server gets HTTP/2's initial 64 KiB of window and no more, as behind a
client that stopped reading; it still answers SETTINGS and PING, as a live
peer does) and opens streams past the server's MAX_CONCURRENT_STREAMS, as
an attacker would.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack

from generated.rpcframe.bench.v1 import bench_pb2
from tests.h2raw import Answer, RawConnection, grpc_frame, read_answer, send_request

#: Seconds the server gets to answer an attack that calls for an answer.
ANSWER_WITHIN = 5.0
SERVICE = "/rpcframe.bench.v1.BenchService/"
MiB = 1024 * 1024
_GOAWAY, _FRAME_HEADER = 0x7, 9
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass
class Attack:
    """What an attacker got, and the sockets it still holds."""

    answered: bool | None  # None: the attack asks for no answer (idle connections, unread streams)
    result: str
    seconds: float
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        """Disconnect every socket of the attack."""
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


def bench_request(**fields: Any) -> bytes:
    """A serialized ``BenchRequest``."""
    return bench_pb2.BenchRequest(**fields).SerializeToString()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# -- raw TCP ---------------------------------------------------------------------------


def _read_to_eof(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Bytes the server sent until it closed (True) or the deadline passed (False)."""
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # reset by the server: closed too
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def _goaway_code(data: bytes) -> str | None:
    """The error code of the first HTTP/2 GOAWAY frame in ``data`` (frames the server sent)."""
    at = 0
    while at + _FRAME_HEADER <= len(data):
        length, kind = int.from_bytes(data[at : at + 3], "big"), data[at + 3]
        body = data[at + _FRAME_HEADER : at + _FRAME_HEADER + length]
        if kind == _GOAWAY and len(body) >= 8:
            return _error_name(int.from_bytes(body[4:8], "big"))
        at += _FRAME_HEADER + length
    return None


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


def _tcp_attack(address: str, payload: bytes) -> Attack:
    """Send ``payload`` on a fresh TCP connection and read until the server closes it."""
    start = time.monotonic()
    with socket.create_connection(_split(address), timeout=ANSWER_WITHIN) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            pass  # the server hung up before reading it all: what we measure next
        data, closed = _read_to_eof(sock, start + ANSWER_WITHIN)
    seconds = time.monotonic() - start
    if data.startswith(b"HTTP/"):
        seen = data.split(b"\r\n", 1)[0].decode("latin-1")
    elif (code := _goaway_code(data)) is not None:
        seen = f"GOAWAY {code}"
    else:
        seen = f"{len(data)} B"
    return Attack(closed, f"{seen}, {'closed' if closed else 'still open'} after {seconds:.2f} s", seconds)


def tcp_garbage(address: str) -> Attack:
    """64 KiB of random bytes instead of the HTTP/2 preface."""
    return _tcp_attack(address, random.Random(9).randbytes(64 * 1024))


def http1_request(address: str) -> Attack:
    """A plain HTTP/1.1 request for a gRPC method."""
    request = (f"POST {SERVICE}Unary HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/grpc\r\n"
               "Content-Length: 5\r\nConnection: close\r\n\r\n\x00\x00\x00\x00\x00")  # fmt: skip
    return _tcp_attack(address, request.encode())


def idle_connections(address: str, count: int = 2000) -> Attack:
    """``count`` TCP connections that never send a byte (held open until ``close()``)."""
    start = time.monotonic()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection(_split(address), timeout=ANSWER_WITHIN))
    except OSError as exc:
        return Attack(None, f"{len(sockets)} connected, then {exc!r}", time.monotonic() - start, sockets)
    return Attack(None, f"{count} connected", time.monotonic() - start, sockets)


def closed_by_server(sockets: Sequence[socket.socket]) -> int:
    """How many of ``sockets`` the server has closed (peeked without blocking, nothing consumed)."""
    closed = 0
    for sock in sockets:
        try:
            closed += sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            pass  # open, nothing to read
        except OSError:
            closed += 1  # reset
    return closed


# -- raw HTTP/2 ----------------------------------------------------------------------------


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: hpack's coder is quadratic in a value's length (16 s for 256 KiB)."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


class _Reckless(h2.connection.H2Connection):
    """h2 that opens streams past the server's MAX_CONCURRENT_STREAMS, as an attacker does."""

    @property
    def open_outbound_streams(self) -> int:
        return 0


class _Unread(RawConnection):
    """A raw connection that records DATA without acknowledging it: the server's window never reopens."""

    def __init__(self, sock: socket.socket, authority: str) -> None:
        super().__init__(sock, authority)
        self.h2 = _Reckless(self.h2.config)

    def _record(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            answer = self.answers.get(event.stream_id or 0)
            if answer is not None:
                answer.data += event.data or b""
            return
        super()._record(event)


def _connect(address: str, kind: type[RawConnection] = RawConnection, settings: bool = True) -> RawConnection:
    """Like ``tests.h2raw.open_connection``, for any connection class, with HPACK without Huffman coding.

    ``settings=False`` returns at once instead of waiting for the server's
    SETTINGS, so what is sent next goes out before the client acknowledged them.
    """
    host, port = _split(address)
    conn = kind(socket.create_connection((host, port), timeout=ANSWER_WITHIN), address)
    conn.h2.encoder = _PlainEncoder()
    conn.h2.initiate_connection()
    conn.flush()
    deadline = time.monotonic() + ANSWER_WITHIN
    while settings and not conn.settings_received and not conn.closed and time.monotonic() < deadline:
        conn.pump(deadline - time.monotonic())
    return conn


def outcome(conn: RawConnection, answer: Answer) -> str:
    """What the attacker saw on one stream."""
    if answer.grpc_status is not None:
        code = _STATUS_NAMES.get(answer.grpc_status, str(answer.grpc_status))
        return f"{code} {answer.grpc_message[:60]!r}"
    if answer.reset_code is not None:
        return f"RST_STREAM {_error_name(answer.reset_code)}"
    if conn.goaway_received:
        return "GOAWAY"
    return "connection closed" if answer.connection_closed else "no answer"


def _answered(conn: RawConnection, sids: Sequence[int], labels: Sequence[str], start: float) -> Attack:
    """Wait (up to the limit) for every stream to end; answered when all did."""
    try:
        for sid in sids:
            read_answer(conn, sid, start + ANSWER_WITHIN - time.monotonic())
    finally:
        conn.close()
    answers = [conn.answers[sid] for sid in sids]
    seen = "; ".join(f"{label}: {outcome(conn, a)}" for label, a in zip(labels, answers, strict=True))
    seconds = time.monotonic() - start
    return Attack(all(a.ended for a in answers), f"{seen} ({seconds:.2f} s)", seconds)


def truncated_frames(address: str) -> Attack:
    """Messages whose length prefix promises more than the stream carries before END_STREAM."""
    start = time.monotonic()
    conn = _connect(address)
    body = bench_request(response_size=8)
    cases = {
        "unary, prefix 100 B > data": ("Unary", grpc_frame(body, declared=100)),
        "server stream, prefix 1 MiB > data": ("ServerStream", grpc_frame(body, declared=MiB)),
        "unary, 3 of 5 prefix bytes": ("Unary", b"\x00\x00\x00"),
    }
    sids = [send_request(conn, SERVICE + method, data) for method, data in cases.values()]
    return _answered(conn, sids, list(cases), start)


def _send_flow_controlled(conn: RawConnection, sid: int, data: bytes, deadline: float) -> None:
    """Send ``data`` then END_STREAM as the server's window allows; stops when the stream ends first."""
    answer = conn.answers[sid]
    while data and not answer.ended and time.monotonic() < deadline:
        room = min(conn.h2.local_flow_control_window(sid), conn.h2.max_outbound_frame_size, len(data))
        if room == 0:
            conn.pump(deadline - time.monotonic())  # WINDOW_UPDATE, or the server's answer
            continue
        conn.h2.send_data(sid, data[:room])
        data = data[room:]
        conn.flush()
    if not data and not answer.ended:
        conn.h2.end_stream(sid)
        conn.flush()


def oversize_message(address: str) -> Attack:
    """One request message of 4 MiB + 1 KiB (the default limit is 4 MiB), sent as flow control allows."""
    start = time.monotonic()
    conn = _connect(address)
    sid = send_request(conn, SERVICE + "Unary", b"", end_stream=False)
    try:
        message = grpc_frame(bench_request(payload=bytes(4 * MiB + 1024)))
        _send_flow_controlled(conn, sid, message, start + ANSWER_WITHIN)
    except (OSError, h2.exceptions.H2Error):
        pass  # the server hung up or reset the stream mid-message: the outcome says how
    return _answered(conn, [sid], ["4 MiB + 1 KiB"], start)


def header_flood(address: str, count: int, size: int, early: bool = False) -> Attack:
    """One call with ``count`` custom headers of ``size`` bytes each (grpc servers advertise 16 KiB).

    ``early``: the headers go out right after the client's preface, before
    the server's SETTINGS (and their limit) are acknowledged.
    """
    start = time.monotonic()
    conn = _connect(address, settings=not early)
    metadata = tuple((f"x-flood-{i}", "v" * size) for i in range(count))
    try:
        sid = send_request(conn, SERVICE + "Unary", grpc_frame(bench_request()), metadata=metadata)
    except OSError:
        conn.close()
        return Attack(True, "connection closed while sending", time.monotonic() - start)
    return _answered(conn, [sid], [f"{count} x {size} B"], start)


def unread_streams(address: str, count: int, messages: int, size: int, observe: float = 0.5) -> Attack:
    """``count`` server streams on one connection, each asking for ``messages`` x ``size`` B, never read.

    Sent as fast as the server's flow control lets requests in (within
    :data:`ANSWER_WITHIN`), then watched for ``observe`` s; the connection
    stays open, its window shut, until ``close()``.
    """
    start = time.monotonic()
    deadline = start + ANSWER_WITHIN
    conn = _connect(address, _Unread)
    request = grpc_frame(bench_request(count=messages, response_size=size))
    sent, note = 0, ""
    try:
        while sent < count and not conn.closed and time.monotonic() < deadline:
            if conn.h2.outbound_flow_control_window < len(request):
                conn.flush()
                conn.pump(deadline - time.monotonic())  # the server's WINDOW_UPDATE for what it read
                continue
            sid = conn.h2.get_next_available_stream_id()
            conn.answers[sid] = Answer()
            conn.h2.send_headers(sid, _headers(address, "ServerStream"))
            conn.h2.send_data(sid, request, end_stream=True)
            sent += 1
            if sent % 100 == 0:
                conn.flush()
        conn.flush()
    except (OSError, h2.exceptions.H2Error) as exc:
        note = f", sending stopped: {type(exc).__name__}"
    if sent < count and not note:
        note = f", sending stopped after {time.monotonic() - start:.1f} s"
    end = time.monotonic() + observe
    while not conn.closed and time.monotonic() < end:
        conn.pump(end - time.monotonic())
    return Attack(None, _unread_summary(conn, sent, note), time.monotonic() - start, [conn.sock])


def _headers(address: str, method: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", SERVICE + method), (":authority", address),
            ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip


def _unread_summary(conn: RawConnection, sent: int, note: str) -> str:
    answers = conn.answers.values()
    result = (f"{sent} streams sent{note}; {sum(a.headers is not None for a in answers)} got headers, "
              f"{sum(a.reset_code is not None for a in answers)} reset, "
              f"{sum(a.grpc_status is not None for a in answers)} ended with a status, "
              f"{sum(len(a.data) for a in answers) // 1024} KiB received")  # fmt: skip
    if conn.goaway_received:
        result += "; GOAWAY"
    elif conn.closed:
        result += "; connection closed"
    return result
