"""Asynchronous calls: any unary method of a ``.proto`` service, called through the broker.

The caller gets a :class:`Receipt` as soon as the request is durably queued;
a :class:`Worker` hands it to the service's ordinary servicer (the one a gRPC
server serves) when a worker is free, and stores the result (or its error
status) under the receipt, where the caller waits for it or fetches it later.

Subjects and streams (``S`` = the service's full name, ``s`` = it with ``_`` for ``.``):

- requests: ``rpc.S.Method`` in work-queue stream ``RPC_s`` (removed once handled);
- results: ``rpc-reply.<receipt>`` in stream ``RPC_REPLIES`` (kept a day);
- dead letters: ``dlq.rpc.S`` in stream ``DLQ_RPC_s``, reason in ``rpcframe-dead-reason``.

A redelivered request (its worker stopped mid-call) runs again only when the
method's ``idempotency_level`` is ``NO_SIDE_EFFECTS`` or ``IDEMPOTENT``; any
other is dead-lettered with the reason and answered ``UNKNOWN`` (it may have run),
never run twice. A redelivery whose result is already stored is just acked.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import Message

from ..errors import DEFAULT_EXCEPTION_STATUS, ConfigError, RpcError, error_for
from . import _headers
from ._broker import BrokerMessage, StreamSpec
from ._client import BaseEvents
from ._consumer import Pump
from ._topic import stream_name

__all__ = ["AsyncCalls", "AsyncMethod", "Receipt", "Worker", "call_dead_letters", "work_queue"]

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
log = logging.getLogger("rpcframe.events")

STATUS = "rpcframe-status"
DETAILS = "rpcframe-status-details"
REPLIES = StreamSpec("RPC_REPLIES", ("rpc-reply.>",), max_age=86400.0)
_IDEMPOTENT = (1, 2)  # MethodOptions.NO_SIDE_EFFECTS, IDEMPOTENT


def work_queue(service: str) -> StreamSpec:
    """The stream a service's queued calls wait in."""
    return StreamSpec(stream_name("RPC", service), (f"rpc.{service}.*",), work_queue=True)


def call_dead_letters(service: str) -> StreamSpec:
    """The stream a service's dead-lettered calls go to."""
    return StreamSpec(stream_name("DLQ_RPC", service), (f"dlq.rpc.{service}",))


@dataclass(frozen=True)
class AsyncMethod(Generic[Req, Resp]):
    """A unary method callable through the broker, typed by its request and response."""

    service: str  # full name, e.g. acme.orders.v1.OrderService
    name: str
    request: type[Req]
    response: type[Resp]
    idempotent: bool = field(init=False)

    def __post_init__(self) -> None:
        try:
            method = descriptor_pool.Default().FindMethodByName(f"{self.service}.{self.name}")
        except KeyError:
            raise ConfigError(f"no method {self.service}.{self.name} (import its generated _pb2 module)") from None
        if method.client_streaming or method.server_streaming:
            raise ConfigError(f"{self.service}.{self.name} streams: only unary methods can be called asynchronously")
        object.__setattr__(self, "idempotent", method.GetOptions().idempotency_level in _IDEMPOTENT)

    @property
    def subject(self) -> str:
        """The subject its requests are queued on."""
        return f"rpc.{self.service}.{self.name}"


@dataclass(frozen=True)
class Receipt(Generic[Resp]):
    """Proof that a call was durably queued; fetch its result with it (it can be kept and sent elsewhere)."""

    id: str
    method: AsyncMethod[Any, Resp]

    @property
    def reply_subject(self) -> str:
        """Where the result is published and stored."""
        return f"rpc-reply.{self.id}"


class AsyncCalls:
    """The caller's side: queue calls, then wait for or fetch their results."""

    def __init__(self, events: BaseEvents) -> None:
        self.events = events

    async def submit(
        self, method: AsyncMethod[Req, Resp], request: Req, *, receipt: str | None = None, ttl: float | None = None
    ) -> Receipt[Resp]:
        """Queue a call; returns once the broker stored it.

        ``receipt`` (default a random id) doubles as the message id: submitting
        the same receipt again queues the call once (within the dedupe window).
        """
        if type(request) is not method.request:
            raise TypeError(
                f"{method.service}.{method.name} takes {method.request.__name__}, not {type(request).__name__}"
            )
        rid = receipt or uuid.uuid4().hex
        headers = _headers.outgoing(request.DESCRIPTOR.full_name, self.events.publisher, ttl, True)
        await self.events.publish_raw(
            work_queue(method.service), method.subject, request.SerializeToString(), headers, rid
        )
        return Receipt(rid, method)

    async def lookup(self, receipt: Receipt[Resp]) -> Resp | None:
        """The result if it is there (``None`` while queued or running); an error status raises its RpcError."""
        await self.events.ensure(REPLIES)
        stored = await self.events.broker.last(REPLIES.name, receipt.reply_subject)
        return None if stored is None else _decode(receipt, stored.data, stored.headers)

    async def result(self, receipt: Receipt[Resp], within: float = 30.0) -> Resp:
        """Wait for the result (at most ``within`` s, else :class:`TimeoutError`); an error status raises."""
        await self.events.ensure(REPLIES)
        async with asyncio.timeout(within), self.events.broker.listen(receipt.reply_subject) as live:
            # Listening first, then looking: a result stored in between is seen by one of the two.
            stored = await self.events.broker.last(REPLIES.name, receipt.reply_subject)
            if stored is not None:
                return _decode(receipt, stored.data, stored.headers)
            async for msg in live:
                return _decode(receipt, msg.data, msg.headers)
        raise TimeoutError(f"no result for {receipt.id}")  # pragma: no cover - the listener ended


def _decode(receipt: Receipt[Resp], data: bytes, headers: Mapping[str, str]) -> Resp:
    code = headers.get(STATUS, "OK")
    if code != "OK":
        raise error_for(grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN,
                        headers.get(DETAILS, ""))  # fmt: skip
    return receipt.method.response.FromString(data)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class BrokerContext:
    """The ``context`` a servicer method gets when called through the broker (a gRPC context's common part)."""

    def __init__(self, headers: Mapping[str, str], left: float | None) -> None:
        self._headers = headers
        self._deadline = None if left is None else time.monotonic() + left
        self.code_: grpc.StatusCode = grpc.StatusCode.OK
        self.details_ = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request's headers, as metadata."""
        return tuple((k.lower(), v) for k, v in self._headers.items())

    def time_remaining(self) -> float | None:
        """Seconds before the call's deadline, or ``None``."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def abort(self, code: grpc.StatusCode, details: str = "") -> Any:
        """End the call with ``code``."""
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status to end with when the method returns."""
        self.code_ = code

    def set_details(self, details: str) -> None:
        """The status details to end with."""
        self.details_ = details

    def peer(self) -> str:
        """Where the call came from: the broker."""
        return "broker"

    def is_active(self) -> bool:
        """Always true: nobody is connected to cancel it."""
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Ignored: results carry no metadata."""

    def send_initial_metadata(self, metadata: Any) -> None:
        """Ignored: results carry no metadata."""

    def add_callback(self, callback: Any) -> bool:
        """Not supported (``False``), as on a call that already ended."""
        return False


class _AioBrokerContext(BrokerContext):
    async def abort(self, code: grpc.StatusCode, details: str = "") -> Any:
        raise _Abort(code, details)

    async def send_initial_metadata(self, metadata: Any) -> None:  # type: ignore[override]
        """Ignored: results carry no metadata."""


@dataclass(frozen=True)
class _Entry:
    call: Any
    is_async: bool
    parse: Any
    serialize: Any
    idempotent: bool
    name: str


class Worker(Pump):
    """Runs a servicer's unary methods for calls queued through the broker.

    ``servicer`` is an ordinary generated-``*Servicer`` instance, sync or
    asyncio. Workers of one service share the queue (start more to scale out).
    Options as :class:`Consumer` (``max_deliveries``, ``concurrency``,
    ``ack_wait`` ...).
    """

    def __init__(self, events: BaseEvents, servicer: object, *, group: str = "workers", **options: Any) -> None:
        from ..server._common import record_services

        services = record_services(servicer)
        if len(services) != 1:
            raise ConfigError(f"{type(servicer).__qualname__} provides {len(services)} services; a Worker runs one")
        self.service = services[0].name
        self._methods = {
            name: self._entry(name, h) for name, h in services[0].handlers.items() if h.unary_unary is not None
        }
        super().__init__(
            events, work_queue(self.service), f"rpc.{self.service}.*", group, call_dead_letters(self.service),
            f"dlq.rpc.{self.service}", **options,
        )  # fmt: skip

    def _entry(self, name: str, handler: grpc.RpcMethodHandler) -> _Entry:
        method = descriptor_pool.Default().FindMethodByName(f"{self.service}.{name}")
        fn = handler.unary_unary
        return _Entry(
            fn, inspect.iscoroutinefunction(fn), handler.request_deserializer, handler.response_serializer,
            method.GetOptions().idempotency_level in _IDEMPOTENT, f"{self.service}.{name}",
        )  # fmt: skip

    async def process(self, msg: BrokerMessage) -> None:
        """Run the call unless it must not run (again); store the result; ack."""
        receipt = msg.headers.get(_headers.MSG_ID, "")
        reply = f"rpc-reply.{receipt}"
        entry = self._methods.get(msg.subject.rpartition(".")[2])
        if entry is None:
            return await self._refuse(msg, reply, grpc.StatusCode.UNIMPLEMENTED, f"no unary method {msg.subject}")
        attempt = msg.delivery_count
        if attempt > 1:
            if await self.events.broker.last(REPLIES.name, reply) is not None:
                return await msg.ack()  # it ran and its result is stored; only the ack was lost
            if not entry.idempotent:
                why = f"redelivered after a worker stopped mid-call; {entry.name} is not idempotent: not run again"
                return await self._refuse(msg, reply, grpc.StatusCode.UNKNOWN, why)
            if attempt > self.max_deliveries:
                why = f"delivered {attempt - 1} times without an answer (workers crashed or exceeded ack_wait)"
                return await self._refuse(msg, reply, grpc.StatusCode.UNAVAILABLE, why)
        try:
            request = entry.parse(msg.data)
        except Exception as exc:  # noqa: BLE001 - bad bytes are the caller's error, never the worker's crash
            return await self._refuse(msg, reply, grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {exc}")
        left = _headers.remaining(msg.headers)
        if left is not None and left <= 0:
            why = f"deadline passed {-left:.3f} s before a worker took the call"
            return await self._refuse(msg, reply, grpc.StatusCode.DEADLINE_EXCEEDED, why)
        code, details, payload = await self._invoke(entry, request, msg, left)
        await self._reply(reply, code, details, payload)
        await msg.ack(self.confirm_acks)
        self.stats.handled += 1

    async def _invoke(
        self, entry: _Entry, request: Any, msg: BrokerMessage, left: float | None
    ) -> tuple[grpc.StatusCode, str, bytes]:
        ctx = (_AioBrokerContext if entry.is_async else BrokerContext)(msg.headers, left)
        try:
            with self.busy(msg), _headers.handler_context(msg.headers, left):
                if entry.is_async:
                    response = await entry.call(request, ctx)
                else:
                    response = await asyncio.to_thread(entry.call, request, ctx)
        except _Abort as exc:
            return exc.code, exc.details, b""
        except RpcError as exc:
            return exc.code(), exc.details(), b""
        except Exception as exc:  # noqa: BLE001 - a failing handler is the call's error status
            return _status_of(exc, entry.name)
        if ctx.code_ is not grpc.StatusCode.OK:
            return ctx.code_, ctx.details_, b""
        return grpc.StatusCode.OK, "", entry.serialize(response)

    async def _reply(self, reply: str, code: grpc.StatusCode, details: str, payload: bytes) -> None:
        headers = {STATUS: code.name}
        if details:
            headers[DETAILS] = details[:2000]
        await self.events.publish_raw(REPLIES, reply, payload, headers, f"reply:{reply}")

    async def _refuse(self, msg: BrokerMessage, reply: str, code: grpc.StatusCode, why: str) -> None:
        # The dead letter is stored before the answer: a caller that sees the error finds it there.
        await self.dead_letter(msg, why, lambda: self._reply(reply, code, why, b""))


def _status_of(exc: Exception, method: str) -> tuple[grpc.StatusCode, str, bytes]:
    for cls, code in DEFAULT_EXCEPTION_STATUS:
        if isinstance(exc, cls):
            return code, str(exc), b""
    ref = uuid.uuid4().hex[:12]
    log.error("asynchronous call of %s failed (ref %s)", method, ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref})", b""
