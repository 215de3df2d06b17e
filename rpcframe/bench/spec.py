"""What one load run is: the target, the method, the request and the load shape."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from ..security.tls import TLSConfig

__all__ = ["DEFAULT_MAX_DURATION", "KIND_LABELS", "BenchError", "LoadSpec", "MethodInfo", "parse_duration"]

Mode = Literal["sync", "aio"]
ClientKind = Literal["raw", "rpcframe"]

#: Time bound of a run given only a call count (-n): every load loop ends.
DEFAULT_MAX_DURATION = 600.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|µs|ms|s|m|h)?\s*$")
_UNIT = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class BenchError(Exception):
    """Bad input or an unusable target: reported as one line, never a traceback."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``10``, ``2.5s``, ``500ms``, ``1m``, ``250us``."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 10s, 500ms, 1m)")
    return float(match.group(1)) * _UNIT[match.group(2)]


#: grpc multicallable kind -> the words reports use.
KIND_LABELS = {
    "unary_unary": "unary",
    "unary_stream": "server-stream",
    "stream_unary": "client-stream",
    "stream_stream": "bidi-stream",
}


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """A resolved method: its path, kind, and the descriptors of its messages.

    Attributes:
        path: ``/package.Service/Method`` as sent on the wire.
        kind: ``unary_unary``, ``unary_stream``, ``stream_unary`` or ``stream_stream``.
        request_type: full name of the request message.
        response_type: full name of the response message.
        files: serialized ``FileDescriptorProto`` of the method's file and its
            dependencies, dependencies first.
        source: ``stubs`` or ``reflection``.
    """

    path: str
    kind: str
    request_type: str
    response_type: str
    files: tuple[bytes, ...]
    source: str

    @property
    def label(self) -> str:
        """The kind in report words (``unary``, ``server-stream`` ...)."""
        return KIND_LABELS[self.kind]

    def message_classes(self) -> tuple[type[Message], type[Message]]:
        """Request and response classes, built in a private descriptor pool."""
        # Imported here: the CLI imports this module to parse flags, before any protobuf is needed.
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        pool = descriptor_pool.DescriptorPool()
        for data in self.files:
            pool.Add(descriptor_pb2.FileDescriptorProto.FromString(data))
        return (
            message_factory.GetMessageClass(pool.FindMessageTypeByName(self.request_type)),
            message_factory.GetMessageClass(pool.FindMessageTypeByName(self.response_type)),
        )


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load run (picklable: sent as is to load-generator processes).

    Attributes:
        target: ``host:port`` of the server.
        method: the resolved method (path, kind, message descriptors).
        request: the serialized request sent by every call.
        mode: ``sync`` (threads, grpc) or ``aio`` (coroutines, grpc.aio).
        client: ``raw`` grpcio channels or ``rpcframe`` channels.
        concurrency: closed loop: callers (threads or coroutines), each with
            one call in flight; open loop: most calls in flight at once.
        rps: open loop arrival rate (calls/s), or ``None`` for closed loop.
        duration: seconds of the measured phase, or ``None`` to stop at
            ``total`` (bounded by ``max_duration`` even then).
        total: calls in the measured phase, or ``None`` to stop at ``duration``.
        warmup: seconds of unrecorded load before the measured phase.
        connections: channels (TCP connections) the callers are spread over.
        stream_messages: requests per client-streaming call.
        call_timeout: deadline of each call (bidi: added to the run's length).
        connect_timeout: seconds to wait for the target to become ready.
        uvloop: aio mode: run on uvloop (else the default asyncio loop).
        max_duration: hard time bound of the measured phase.
        metadata: sent with every call (``-H``).
        tls: connect with TLS (None: plaintext).
        token: bearer token sent with every call (``authorization``).
    """

    target: str
    method: MethodInfo
    request: bytes
    mode: Mode = "aio"
    client: ClientKind = "rpcframe"
    concurrency: int = 1
    rps: float | None = None
    duration: float | None = None
    total: int | None = None
    warmup: float = 0.0
    connections: int = 1
    stream_messages: int = 1
    call_timeout: float = 20.0
    connect_timeout: float = 5.0
    uvloop: bool = True
    max_duration: float = DEFAULT_MAX_DURATION
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    tls: TLSConfig | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise BenchError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.connections < 1:
            raise BenchError(f"connections must be >= 1, got {self.connections}")
        if self.rps is not None and not (self.rps > 0 and math.isfinite(self.rps)):
            raise BenchError(f"rps must be > 0, got {self.rps}")
        if self.duration is not None and not self.duration > 0:
            raise BenchError(f"duration must be > 0, got {self.duration}")
        if self.total is not None and self.total < 1:
            raise BenchError(f"total must be >= 1, got {self.total}")
        if self.warmup < 0:
            raise BenchError(f"warmup must be >= 0, got {self.warmup}")
        if self.stream_messages < 1:
            raise BenchError(f"stream messages must be >= 1, got {self.stream_messages}")
        if self.rps is not None and self.method.kind == "stream_stream":
            # A ping-pong stream has one message in flight by definition; an
            # arrival rate would need a stream per arrival, which is unary.
            raise BenchError("--rps (open loop) supports unary, server- and client-streaming methods, not bidi")

    @property
    def time_limit(self) -> float:
        """Seconds after which the measured phase ends, whatever the count."""
        return min(self.duration, self.max_duration) if self.duration is not None else self.max_duration

    @property
    def open_loop(self) -> bool:
        """Whether calls start on a fixed schedule (``rps``) instead of back to back."""
        return self.rps is not None

    def split(self, parts: int) -> list[LoadSpec]:
        """This load divided among ``parts`` processes (concurrency, rate and count).

        Every part gets at least one caller; parts beyond the concurrency (or
        the call count) would be idle, so the number of parts is capped.
        """
        parts = max(1, min(parts, self.concurrency, self.total or parts))
        specs = []
        for i in range(parts):
            concurrency = _share(self.concurrency, parts, i)
            total = None if self.total is None else _share(self.total, parts, i)
            rps = None if self.rps is None else self.rps / parts
            specs.append(replace(self, concurrency=concurrency, total=total, rps=rps,
                                 connections=max(1, _share(self.connections, parts, i))))  # fmt: skip
        return specs


def _share(value: int, parts: int, index: int) -> int:
    """The ``index``-th of ``parts`` near-equal integer shares of ``value``."""
    return value // parts + (1 if index < value % parts else 0)
