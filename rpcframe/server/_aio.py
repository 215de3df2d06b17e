"""The asyncio server front (grpc.aio)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Any, NoReturn

import grpc
import grpc.aio
from grpc._cython import cygrpc  # ExecuteBatchError, which grpc.aio does not re-export
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .. import _loop
from .._core.deadline import CallScope, scope_var
from .._core.overload import Admission
from ..config import ServerConfig, is_small
from ..errors import DeadlineExceeded, RpcError
from ..observe import CallObserver, ServerCallInfo
from . import _heap, _reflection
from ._common import (
    NO_REQUEST,
    NOT_RUN,
    BadRequest,
    Drain,
    IncomingScope,
    ServerBase,
    checked_requests,
    is_grpc_abort,
    observe_finished,
    observe_received,
    response_threshold,
    status_for_exception,
)

__all__ = ["Server"]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_EOF = grpc.aio.EOF


class _Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 for the asyncio server, with Watch streams that can end.

    grpcio's asyncio health servicer keeps Watch streams open forever, so a
    draining server would wait out the whole grace period for them (and a
    second grpc.aio ``stop()`` to cut them short can crash grpcio). Here
    ``close()`` lets every Watch send its last status and finish with OK.
    """

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": _SERVING}
        self._version = 0
        self._changed = asyncio.Condition()
        self._shutting_down = False
        self._closed = False

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - grpc method name
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> None:  # noqa: N802 - grpc method name
        seen, last = -1, None
        while True:
            if seen != self._version:
                seen = self._version
                status = self._status.get(request.service, _SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
            if self._closed:
                return
            async with self._changed:
                while seen == self._version and not self._closed:
                    await self._changed.wait()

    async def _notify(self) -> None:
        self._version += 1
        async with self._changed:
            self._changed.notify_all()

    async def set(self, service: str, status: int) -> None:
        """Set a service's status (ignored once shutdown began)."""
        if not self._shutting_down:
            self._status[service] = status
            await self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service, for good."""
        self._shutting_down = True
        self._status = dict.fromkeys(self._status, _NOT_SERVING)
        await self._notify()

    async def close(self) -> None:
        """End every Watch stream after its last update."""
        self._closed = True
        await self._notify()


class Server(ServerBase):
    """A gRPC server running ``async def`` handlers on the event loop.

    Same API as :class:`rpcframe.Server`, with ``start``/``stop``/``wait``/
    ``set_serving``/``run`` as coroutines and ``async with`` support.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        super().__init__(config or ServerConfig())
        cfg = self.config
        self._grpc_server = _AnswersEmptyRequests(
            grpc.aio.server(options=cfg.server_options(), maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        )
        self.health = _Health() if cfg.health else None
        self._inflight = 0
        self._refusing = False
        self._drainer: Drain | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._lag_watch: threading.Event | None = None  # set: the loop-lag thread ends

    def _watch_lag(self, loop: asyncio.AbstractEventLoop, period: float, stop: threading.Event) -> None:
        """Keep the governor's queueing delay: how long the event loop takes to run a callback.

        A CPU-bound handler never yields, so under overload calls wait in the
        loop's queue, not in the handler: the loop's lag is that wait. Like
        CoDel's standing queue, the delay is the least of the last few
        readings, so one long handler, a GC pause or a moment without the
        CPU does not count as a queue; a queue that stays does.

        A thread of its own queues the probes, ``period`` seconds after the
        last one ran, at moments unrelated to the calls. A timer on the loop
        would read the same, but while one is scheduled every turn of the
        loop computes a select() timeout: 3 Python frames and ~12 C calls
        per unary call (counted with a profile hook). A callback queued by
        the calls themselves reads less: it runs before the handler that
        then blocks the loop (grpc.aio hands calls over one at a time, each
        awaiting its request first), so it never sees a CPU-bound queue.
        """
        readings, governor = [0.0] * 4, self.governor
        turn = itertools.cycle(range(len(readings)))
        ran = threading.Event()

        def arrived(sent: float) -> None:
            readings[next(turn)] = max(0.0, time.monotonic() - sent)
            governor.queue_delay = min(readings)
            ran.set()

        while not stop.wait(period):
            ran.clear()
            try:
                loop.call_soon_threadsafe(arrived, time.monotonic())
            except RuntimeError:
                return  # the loop was closed without stop()
            # One probe at a time, as a timer re-armed after each reading: a stall
            # gives one reading, not one per period of it, the last ones short.
            while not ran.wait(1.0):
                if stop.is_set() or loop.is_closed():
                    return

    async def start(self) -> None:
        """Register health and reflection, then accept calls."""
        if self._started:
            return
        if not self._ports:
            raise RuntimeError("bind() an address before start()")
        names = list(self.service_names)
        if self.health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc_server)
            for name in names:
                await self.health.set(name, _SERVING)
            names.append(health.SERVICE_NAME)
        if self.config.reflection:
            names.extend(_reflection.SERVICE_NAMES)
            _reflection.enable_reflection(names, self._grpc_server)
        await self._grpc_server.start()
        self._started = True
        if self.config.overload is not None:
            self._lag_watch = threading.Event()
            args = (asyncio.get_running_loop(), self.config.overload.queue_target, self._lag_watch)
            threading.Thread(target=self._watch_lag, args=args, name="rpcframe-loop-lag", daemon=True).start()
        _heap.hold()  # freed connection memory goes back to the OS

    async def set_serving(self, service: str, serving: bool) -> None:
        """Report ``service`` ("" for the whole server) as SERVING or NOT_SERVING."""
        if self.health is not None:
            await self.health.set(service, _SERVING if serving else _NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop (see :meth:`rpcframe.Server.stop`). Safe to call twice."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain(self.config.grace_period if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def _drain(self, grace: float) -> None:
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.config.drain_delay and self._started and grace > 0:  # stop(0): at once
            await asyncio.sleep(self.config.drain_delay)
        # From now on arriving calls are refused unrun (the never-ran marker
        # lets clients send them elsewhere) while the accepted ones finish;
        # then grpc sends GOAWAY and cancels what is left after the grace.
        drain = self._drainer = Drain(time.monotonic(), grace)
        self._refusing = True
        while not drain.over(time.monotonic(), self._inflight > 0):  # noqa: ASYNC110 - waits for a quiet period, which no event marks
            await asyncio.sleep(Drain.POLL)
        if self._lag_watch is not None:
            self._lag_watch.set()
        graceful = asyncio.ensure_future(self._grpc_server.stop(drain.grace_left(time.monotonic())))
        if self.health is not None:
            await self.health.close()
        await graceful
        if self._started:
            _heap.unhold()

    async def wait(self) -> None:
        """Wait until the server has stopped (bound it with ``asyncio.timeout``)."""
        await self._grpc_server.wait_for_termination()

    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        """Start, wait for SIGTERM or SIGINT, then drain and stop."""
        try:
            async with _loop.stop_signals() as stop_requested:
                await self.start()
                if on_ready is not None:
                    on_ready()
                await stop_requested.wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- the one per-call wrapper -------------------------------------------

    def _refuse_quietly(self, context: grpc.aio.ServicerContext) -> None:
        if self._drainer is not None:
            self._drainer.refused(time.monotonic())
        _end_unrun(context, *NOT_RUN)

    def _leave(self) -> None:
        self._inflight -= 1

    async def _fail(self, exc: Exception, context: grpc.aio.ServicerContext, method: str) -> NoReturn:
        if is_grpc_abort(exc, context):
            raise exc
        code, details, trailing = status_for_exception(exc, self.config, method)
        await context.abort(code, details, trailing)
        raise AssertionError("unreachable: abort() raises")  # pragma: no cover

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming:
            key = "stream_stream" if handler.response_streaming else "stream_unary"
        else:
            key = "unary_stream" if handler.response_streaming else "unary_unary"
        behaviour = getattr(handler, key)
        if inspect.isasyncgenfunction(behaviour) or inspect.isgeneratorfunction(behaviour):
            wrapped: Callable[..., Any] = self._wrap_generator(method, behaviour, handler.request_streaming)
        else:
            streaming = handler.response_streaming or handler.request_streaming
            admission = self.governor.admission(method, streaming)  # None: streams, or protection off
            reads_itself = key == "unary_unary"  # registered request-streaming: see _reading_request
            wrapped = self._wrap_function(method, behaviour, handler.request_streaming, admission, reads_itself)
            if reads_itself:
                setattr(wrapped, _READS_ITS_REQUEST, True)
        return handler._replace(**{key: wrapped})

    def _wrap_function(
        self, method: str, behaviour: Callable[..., Any], streamed: bool, admission: Admission | None,
        reads_itself: bool = False,
    ) -> Callable[..., Any]:  # fmt: skip
        # Plain functions are the generated base's "not implemented" stubs
        # (or handlers that write with context.write); they run inline.
        is_async = inspect.iscoroutinefunction(behaviour)
        cap, observer = self.config.max_deadline, self._observer
        guard = self._guard_for(method)  # auth check; None (free) without ServerConfig.auth
        governor, now = self.governor, time.monotonic
        limiters = governor.rate_limiters(method)  # () without ServerConfig.rate_limits
        small = response_threshold(self.config)  # None unless the server compresses responses

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # Refusals end the call before its request is read, and without
            # abort(): under overload refusing is most of the work (see
            # _end_unrun), and an unauthenticated caller's bytes stay unparsed.
            if self._refusing:
                return self._refuse_quietly(context)
            if guard is not None and (denied := guard(context)) is not None:
                return _end_unrun(context, *denied)
            if limiters and (refused := governor.limit(limiters, context)) is not None:
                return _end_unrun(context, *refused)
            started = 0.0 if admission is None else now()
            if admission is not None and (rejected := admission.begin(started, context)) is not None:
                return _end_unrun(context, *governor.refusal(rejected))
            try:  # admitted: the admission hears of the call's end, however it ends
                if reads_itself:  # _one_request inline: one coroutine less per call
                    request = await context.read()
                    if request is _EOF:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST)
                if type(request) is BadRequest:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
                if streamed:
                    request = checked_requests(request, context)  # a message that does not parse: INVALID_ARGUMENT
                info = None if observer is None else await _received(observer, method, context, request)
                self._inflight += 1
                # Each call runs in its own task, so the scope is this call's alone.
                scope = IncomingScope(context, cap)
                scope_var.set(scope)
                try:
                    result = behaviour(request, context)
                    if is_async:
                        result = await result if cap is None else await _capped(result, scope, cap)
                    if small is not None and is_small(result, small):
                        context.disable_next_message_compression()
                    if info is not None:
                        info.response = result
                    return result
                except asyncio.CancelledError:
                    scope.cancel_all()  # the caller cancelled or its deadline passed
                    raise
                except _WRITE_FAILED:
                    scope.cancel_all()  # a write with context.write found the client gone
                    raise asyncio.CancelledError from None
                except Exception as exc:
                    await self._fail(exc, context, method)
                finally:
                    scope.ended = True
                    self._inflight -= 1  # one thread: no lock, and no method call
                    if info is not None:
                        observe_finished(observer, info, sys.exc_info()[1])  # type: ignore[arg-type]
            finally:
                if admission is not None:
                    admission.end(started, now())

        return call

    def _wrap_generator(self, method: str, behaviour: Callable[..., Any], streamed: bool) -> Callable[..., Any]:
        cap, observer = self.config.max_deadline, self._observer
        guard = self._guard_for(method)  # auth check; None (free) without ServerConfig.auth
        governor = self.governor
        limiters = governor.rate_limiters(method)
        small = response_threshold(self.config)  # None unless the server compresses responses

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self._refusing:
                self._refuse_quietly(context)
                return
            if guard is not None and (denied := guard(context)) is not None:
                await context.abort(*denied)
            if limiters and (refused := governor.limit(limiters, context)) is not None:
                await context.abort(*refused)
            if type(request) is BadRequest:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            if streamed:
                request = checked_requests(request, context)  # a message that does not parse: INVALID_ARGUMENT
            info = None if observer is None else await _received(observer, method, context, request)
            self._inflight += 1
            scope = IncomingScope(context, cap)
            token = scope_var.set(scope)
            try:
                responses = behaviour(request, context)
                if inspect.isasyncgen(responses):
                    async for response in responses:
                        if small is not None and is_small(response, small):
                            context.disable_next_message_compression()
                        yield response
                else:
                    for response in responses:
                        if small is not None and is_small(response, small):
                            context.disable_next_message_compression()
                        yield response
            except asyncio.CancelledError:
                scope.cancel_all()
                raise
            except Exception as exc:
                await self._fail(exc, context, method)
            finally:
                scope.ended = True
                try:
                    scope_var.reset(token)
                except ValueError:
                    pass  # finalized outside the call's task
                self._leave()
                if info is not None:
                    observe_finished(observer, info, sys.exc_info()[1])  # type: ignore[arg-type]

        return stream


async def _received(
    observer: CallObserver, method: str, context: grpc.aio.ServicerContext, request: Any
) -> ServerCallInfo:
    try:
        return observe_received(observer, method, context, request)
    except RpcError as refused:  # the observer refused the call (admission control)
        await context.abort(refused.code(), refused.details())
        raise AssertionError("unreachable: abort() raises") from None  # pragma: no cover


async def _capped(result: Any, scope: CallScope, cap: float) -> Any:
    """Await a handler within ``ServerConfig.max_deadline``."""
    timeout = asyncio.timeout(scope.remaining(time.monotonic()))
    try:
        async with timeout:
            return await result
    except TimeoutError:
        if not timeout.expired():
            raise  # the handler's own TimeoutError
        raise DeadlineExceeded(f"the handler ran past its deadline (server max_deadline {cap} s)") from None


# -- unary requests that never arrive ------------------------------------------
#
# grpc.aio's server reads a unary method's request itself and, when the stream
# ends without a whole message (no DATA, or a length prefix longer than the
# bytes sent), returns without ever sending a status: the call stays open
# until the client goes away, holds its memory, and stop() waits out the grace
# period for it. Registering every unary-request method as a request-streaming
# one lets the handler read the request itself (context.read(), the same core
# operation) and answer a missing message with INVALID_ARGUMENT.

def _write_failure() -> type[Exception]:
    """What grpc.aio's ``context.write`` raises once the call is over (the client left, or cancelled it)."""
    error = getattr(cygrpc, "ExecuteBatchError", None)
    if isinstance(error, type) and issubclass(error, Exception):
        return error
    return type("_NeverRaised", (Exception,), {})  # grpc renamed it: writes fail loudly again, nothing breaks


#: grpc.aio logs a handler's ExecuteBatchError at ERROR with a traceback
#: unless it has already seen the client close the call, and a write blocked
#: on flow control fails before it does when a client that stopped reading
#: goes away. That is the client leaving, not an error: the handler ends as
#: a cancelled call, which grpc.aio ends quietly.
_WRITE_FAILED = _write_failure()


#: rpcframe's unary_unary wrappers carry this attribute: registered as
#: request-streaming as they are, they read the request themselves once
#: they have not refused the call (the request iterator grpc passes is unused).
_READS_ITS_REQUEST = "_rpcframe_reads_its_request"


def _end_unrun(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
) -> None:
    """End a call with a status without raising; the handler then returns None.

    grpc.aio's abort() raises through the handler's frames and sends the
    status in a batch of its own; setting it and returning sends it with
    the handler's end. Refusing is most of what an overloaded server does,
    and this is its cheapest form on this front: with the request left
    unread, a refused call costs the process ~510k instructions instead of
    ~587k (callgrind, all threads; an empty echo costs ~575k).
    """
    context.set_code(code)
    context.set_details(details)
    if trailers:
        context.set_trailing_metadata(trailers)


async def _one_request(context: Any) -> Any:
    """The call's single request message, or INVALID_ARGUMENT when none arrived whole."""
    request = await context.read()
    if request is grpc.aio.EOF:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST)
    return request


async def _write_all(responses: AsyncGenerator[Any, None], context: Any) -> None:
    """Write a handler's responses as grpc.aio's own loop would; a client gone ends the call as cancelled."""
    try:
        async for response in responses:
            await context.write(response)
    except _WRITE_FAILED:
        await responses.aclose()  # the handler's cleanup runs now
        raise asyncio.CancelledError from None  # the client is gone (see _WRITE_FAILED)


def _writing_responses(handler: Any) -> Any:
    """A bidi ``handler`` whose async generator's responses are written by :func:`_write_all`, not grpc.aio."""
    streaming = handler.stream_stream
    if not handler.response_streaming or not inspect.isasyncgenfunction(streaming):
        return handler

    async def stream_response(requests: Any, context: Any) -> None:
        await _write_all(streaming(requests, context), context)

    return handler._replace(stream_stream=stream_response)


def _reading_request(handler: Any) -> Any:
    """``handler`` registered as request-streaming, reading its one request first.

    Only async behaviours change (rpcframe's wrappers and grpcio's health
    servicer); anything else is returned as it is. Response streams are
    written by :func:`_write_all` (bidi ones too).
    """
    if handler is None:
        return handler
    if handler.request_streaming:
        return _writing_responses(handler)
    if not handler.response_streaming:
        unary = handler.unary_unary
        if getattr(unary, _READS_ITS_REQUEST, False):  # rpcframe's wrapper: it reads once it has not refused
            return handler._replace(request_streaming=True, unary_unary=None, stream_unary=unary)
        if not inspect.iscoroutinefunction(unary):
            return handler

        async def unary_response(_requests: Any, context: Any) -> Any:
            return await unary(await _one_request(context), context)

        return handler._replace(request_streaming=True, unary_unary=None, stream_unary=unary_response)
    streaming = handler.unary_stream
    if inspect.isasyncgenfunction(streaming):

        async def stream_response(_requests: Any, context: Any) -> None:
            await _write_all(streaming(await _one_request(context), context), context)
    elif inspect.iscoroutinefunction(streaming):

        async def stream_response(_requests: Any, context: Any) -> None:
            try:
                await streaming(await _one_request(context), context)  # writes with context.write
            except _WRITE_FAILED:
                raise asyncio.CancelledError from None  # the client is gone (see _WRITE_FAILED)
    else:
        return handler
    return handler._replace(request_streaming=True, unary_stream=None, stream_stream=stream_response)


class _ReadingGenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose unary-request methods read their request themselves."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return _reading_request(self._inner.service(handler_call_details))


class _MethodTable(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every registered method of the server, found by one dict lookup per call.

    grpc.aio keeps a pending request per method registered with
    ``add_registered_method_handlers`` and, after each call it accepts,
    waits on all of them again (``asyncio.wait`` over a task per method):
    the four methods of the echo service cost ~250 Python bytecodes a call,
    more with every method added (``python -m benchmarks.bytecodes``). Served
    through a generic handler instead, grpc.aio requests any call at once,
    and the lookup costs ~10 bytecodes whatever the number of methods.
    """

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}  # full path ("/pkg.Service/Method") -> handler

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.methods.get(handler_call_details.method)


class _AnswersEmptyRequests:
    """A grpc.aio server whose unary-request methods always answer and whose failed writes are quiet (see above).

    Registered methods go into a :class:`_MethodTable`, looked up before any
    other generic handler; grpc.aio registers none itself.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self._table = _MethodTable()
        server.add_generic_rpc_handlers((self._table,))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._table.methods.update({f"/{service}/{m}": _reading_request(h) for m, h in handlers.items()})

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_ReadingGenericHandler(h) for h in handlers))
