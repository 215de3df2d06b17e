"""A raw HTTP/2 gRPC client for hostile-input tests (the ``h2`` package).

grpcio's own client only sends well-formed frames. These helpers open a
plain socket to a server and send whatever gRPC body bytes a test wants
(a length prefix that lies, a half message, ...), then read back what the
server answers on that stream: headers, trailers, or an RST_STREAM.

    conn = open_connection(port)
    stream = send_request(conn, "/pkg.Service/Method", grpc_frame(b"...", declared=100))
    answer = read_answer(conn, stream, timeout=5)
    conn.close()
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

__all__ = ["Answer", "RawConnection", "grpc_frame", "open_connection", "read_answer", "send_request"]


def grpc_frame(payload: bytes, *, declared: int | None = None, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message; ``declared`` overrides the length the prefix claims."""
    length = len(payload) if declared is None else declared
    return struct.pack(">BI", int(compressed), length) + payload


@dataclass
class Answer:
    """What the server sent back on one stream (``None`` fields: not seen)."""

    headers: dict[str, str] | None = None
    trailers: dict[str, str] | None = None
    data: bytes = b""
    reset_code: int | None = None
    connection_closed: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def grpc_status(self) -> int | None:
        """The ``grpc-status`` the server sent, in trailers or trailers-only headers."""
        for block in (self.trailers, self.headers):
            if block is not None and "grpc-status" in block:
                return int(block["grpc-status"])
        return None

    @property
    def grpc_message(self) -> str:
        """The ``grpc-message`` (percent-encoded as sent), or ""."""
        for block in (self.trailers, self.headers):
            if block is not None and "grpc-message" in block:
                return block["grpc-message"]
        return ""

    @property
    def ended(self) -> bool:
        """Whether the stream got a final answer: a status, a reset, or the connection went away."""
        return self.grpc_status is not None or self.reset_code is not None or self.connection_closed


class RawConnection:
    """One client HTTP/2 connection over a plain socket; answers are kept per stream.

    ``closed`` turns true once nothing more will be read: the server closed
    the socket, sent GOAWAY (``goaway_received``; h2 takes no frame after it,
    and events that came in the same read as the GOAWAY are lost), or broke
    the protocol. The socket itself stays open until :meth:`close`, the way
    a client that ignores GOAWAY would keep it.
    """

    def __init__(self, sock: socket.socket, authority: str) -> None:
        self.sock = sock
        self.authority = authority
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.answers: dict[int, Answer] = {}
        self.closed = False
        self.settings_received = False
        self.goaway_received = False

    def flush(self) -> None:
        """Send whatever h2 has queued."""
        out = self.h2.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self, timeout: float) -> bool:
        """Read once (waiting at most ``timeout`` s) and record events; False when nothing came."""
        if self.closed:
            return False
        self.sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._connection_gone()
            return False
        try:
            events = self.h2.receive_data(chunk)
        except h2.exceptions.ProtocolError:
            # grpc sends a PING right after its first GOAWAY, which h2 refuses once closed.
            self.goaway_received = self.h2.state_machine.state is h2.connection.ConnectionState.CLOSED
            self._connection_gone()
            return False
        for event in events:
            self._record(event)
        self.flush()  # WINDOW_UPDATE, SETTINGS and PING acks
        return True

    def _connection_gone(self) -> None:
        self.closed = True
        for answer in self.answers.values():
            answer.connection_closed = True

    def _record(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        if isinstance(event, h2.events.ConnectionTerminated):
            # h2 takes no more frames after a GOAWAY: what was not answered yet never will be.
            self.goaway_received = True
            self._connection_gone()
            return
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
            return
        if stream_id is None or stream_id not in self.answers:
            return
        answer = self.answers[stream_id]
        answer.events.append(type(event).__name__)
        if isinstance(event, h2.events.ResponseReceived):
            answer.headers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.TrailersReceived):
            answer.trailers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            answer.data += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamReset):
            answer.reset_code = int(event.error_code)

    def close(self) -> None:
        """Close the socket (without a GOAWAY: like a client that just goes away)."""
        self.closed = True
        self.sock.close()


def open_connection(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> RawConnection:
    """Connect, send the preface and SETTINGS, and wait for the server's SETTINGS."""
    sock = socket.create_connection((host, port), timeout=timeout)
    conn = RawConnection(sock, f"{host}:{port}")
    conn.h2.initiate_connection()
    conn.flush()
    deadline = time.monotonic() + timeout
    while not conn.settings_received and not conn.closed and time.monotonic() < deadline:
        conn.pump(deadline - time.monotonic())
    if not conn.settings_received:
        conn.close()
        raise ConnectionError(f"no HTTP/2 SETTINGS from {host}:{port} within {timeout} s")
    return conn


def send_request(
    conn: RawConnection,
    path: str,
    body: bytes,
    *,
    end_stream: bool = True,
    metadata: tuple[tuple[str, str], ...] = (),
) -> int:
    """Open a stream: gRPC request headers for ``path``, then ``body`` as one DATA frame; returns the stream id."""
    stream_id = conn.h2.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", conn.authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    ]
    conn.answers[stream_id] = Answer()
    conn.h2.send_headers(stream_id, headers, end_stream=not body and end_stream)
    if body:
        conn.h2.send_data(stream_id, body, end_stream=end_stream)
    conn.flush()
    return stream_id


def read_answer(conn: RawConnection, stream_id: int, timeout: float) -> Answer:
    """Read until stream ``stream_id`` ends (status, reset or connection gone) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    answer = conn.answers[stream_id]
    while not answer.ended:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        conn.pump(left)
    return answer
