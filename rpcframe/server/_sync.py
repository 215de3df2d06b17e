"""The thread-pool server front (grpc)."""

from __future__ import annotations

import collections
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .._core.deadline import CallScope, scope_var
from ..config import ServerConfig, is_small
from ..errors import RpcError
from ..observe import CallObserver, ServerCallInfo
from . import _heap, _reflection
from ._common import (
    NO_REQUEST,
    NOT_RUN,
    BadRequest,
    Drain,
    IncomingScope,
    Refusal,
    ServerBase,
    StallWatch,
    is_grpc_abort,
    observe_finished,
    observe_received,
    response_threshold,
    status_for_exception,
    watch_reads,
    watched_requests,
)
from ._pool import HandlerPool, Task

__all__ = ["Server"]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the grace period, cancelled handlers get this long to return.
_CANCEL_WAIT = 5.0


class _Health(health.HealthServicer):  # type: ignore[misc]
    """grpcio's thread-pool health servicer without its shutdown deadlock.

    grpcio's ``set()`` writes to every Watch stream while holding the lock
    that grpc's server thread needs to finish a closing Watch; the write
    waits for that thread, so a status change racing a client hang-up
    (typically SIGTERM's NOT_SERVING) can hang the server for good. Here
    writes happen under a separate lock the server thread never takes, which
    also keeps every watcher's updates in order.
    """

    _gracefully_shutting_down: bool

    def __init__(self) -> None:
        super().__init__()
        self._send_lock = threading.Lock()
        self._ended: set[Any] = set()  # Watch streams close() ended (their close callback must not end them again)

    def Watch(self, request: Any, context: Any, send_response_callback: Any = None) -> Any:  # noqa: N802
        if send_response_callback is None:
            return super().Watch(request, context)  # blocking fallback, not used by grpcio >= 1.20
        service = request.service
        with self._send_lock:
            with self._lock:
                status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                self._send_response_callbacks.setdefault(service, set()).add(send_response_callback)
                context.add_callback(self._watch_closed(send_response_callback, service))
            send_response_callback(health_pb2.HealthCheckResponse(status=status))
        return None

    def _watch_closed(self, send: Any, service: str) -> Callable[[], None]:
        def closed() -> None:
            with self._lock:
                self._send_response_callbacks.get(service, set()).discard(send)
                ended = send in self._ended
                self._ended.discard(send)
            if not ended:
                send(None)  # grpc's own callback ends the stream the same way

        return closed

    def close(self) -> None:
        """End every Watch stream with OK, so they do not hold the server's shutdown."""
        with self._send_lock:
            with self._lock:
                watchers = [send for group in self._send_response_callbacks.values() for send in group]
                self._ended.update(watchers)
            for send in watchers:
                send(None)

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell its watchers (ignored once shutdown began)."""
        with self._send_lock:
            with self._lock:
                if self._gracefully_shutting_down:
                    return
                self._server_status[service] = status
                watchers = tuple(self._send_response_callbacks.get(service, ()))
            _tell(watchers, status)

    def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service, for good."""
        with self._send_lock:
            with self._lock:
                if self._gracefully_shutting_down:
                    return
                self._gracefully_shutting_down = True
                services = list(self._server_status)
                for service in services:
                    self._server_status[service] = _NOT_SERVING
                watchers = [tuple(self._send_response_callbacks.get(s, ())) for s in services]
            for group in watchers:
                _tell(group, _NOT_SERVING)


def _tell(watchers: tuple[Any, ...], status: int) -> None:
    response = health_pb2.HealthCheckResponse(status=status)
    for send in watchers:
        send(response)


_late = threading.local()


def _run_late(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    _late.arrived = True
    try:
        return fn(*args, **kwargs)
    finally:
        _late.arrived = False


def _arrived_late() -> bool:
    """Whether the call this thread handles reached grpc after the server began refusing."""
    return bool(getattr(_late, "arrived", False))


def _one_request(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
    """A unary call's request message, or INVALID_ARGUMENT when the stream ended without a whole one.

    grpc's own read of a unary request answers a missing or truncated
    message with UNIMPLEMENTED ("requires exactly one request message"), a
    status that tells the caller the method does not exist.
    """
    request = next(requests, None)  # the same core read grpc would do; None: the stream ended
    if request is None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST)
    return request


def _refusal(context: grpc.ServicerContext, drain: Drain | None) -> tuple[grpc.StatusCode, str]:
    if drain is not None:
        drain.refused(time.monotonic())
    code, details, trailing = NOT_RUN
    context.set_trailing_metadata(trailing)
    return code, details


def _end_unrun(context: grpc.ServicerContext, refusal: Refusal) -> NoReturn:
    """End a call its handler never saw (overload, rate limit), marked so clients may send it elsewhere."""
    code, details, trailing = refusal
    context.set_trailing_metadata(trailing)
    context.abort(code, details)
    raise AssertionError("unreachable: abort() raises")  # pragma: no cover


def _received(observer: CallObserver, method: str, context: grpc.ServicerContext, request: Any) -> ServerCallInfo:
    try:
        return observe_received(observer, method, context, request)
    except RpcError as refused:  # the observer refused the call (admission control)
        context.abort(refused.code(), refused.details())
        raise AssertionError("unreachable: abort() raises") from None  # pragma: no cover


class _Executor(HandlerPool):
    """grpc's handler pool; it marks the calls grpc hands it once the server drains.

    grpc submits each call it accepts at once, so a task submitted after
    :meth:`refuse_late` is a call that arrived after the drain began: the
    wrapper ends it unrun, with the never-ran marker, and the client sends
    it elsewhere. Calls accepted before still run.
    """

    def refuse_late(self) -> None:
        """From now on every task is a call that arrived after the drain began.

        The marking submit replaces the pool's on this instance only now,
        so until a drain grpc's submits pay for no frame of ours.
        """
        submit = super().submit

        def late_submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Task:
            return submit(_run_late, fn, *args, **kwargs)

        self.submit = late_submit  # type: ignore[method-assign]


class _Scope(IncomingScope):
    """An incoming call's scope on the thread-pool server.

    A sync handler cannot be interrupted, so when its call is cancelled or
    its deadline passes, grpc's termination callback cancels the outgoing
    calls it has in flight. The callback is registered with the first
    outgoing call, so handlers that call nothing pay nothing for it.
    """

    __slots__ = ()

    def track(self, call: Any) -> None:
        if self.calls is None and not self.cancelled:  # the first outgoing call (cancel_all empties calls too)
            if not self.context.add_callback(self.cancel_all):
                self.cancel_all()  # the incoming call is already over
        super().track(call)


def _end_scope(scope: CallScope, token: Any) -> None:
    scope.ended = True
    try:
        scope_var.reset(token)
    except ValueError:
        pass  # a response generator closed from another thread: its context is gone anyway


class Server(ServerBase):
    """A gRPC server running handlers on a thread pool.

    Example::

        server = rpcframe.Server()
        server.add(MyServicer())
        port = server.bind("127.0.0.1:0")
        server.start()
        ...
        server.stop()  # drains: NOT_SERVING, refuse new calls, finish in-flight

    Every handler runs inside rpcframe's one server-side wrapper, which maps
    exceptions to statuses (see :mod:`rpcframe.errors`) and counts in-flight
    calls so ``stop()`` ends as soon as they are done.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        super().__init__(config or ServerConfig())
        cfg = self.config
        self._executor = _Executor(cfg.max_workers, "rpcframe-handler")
        self.governor.queued = self._executor.queue.qsize  # calls waiting for a worker
        self._refusing = False
        self._drain: Drain | None = None
        self._grpc_server = grpc.server(
            self._executor,
            options=cfg.server_options(threads=True),
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        # Streaming handlers whose client stops reading or sending are ended
        # (stream_write_timeout / stream_read_timeout) so they free their thread.
        self._stalls = StallWatch(cfg.stream_write_timeout, cfg.stream_read_timeout)
        self.health = _Health() if cfg.health else None
        self._idle = threading.Condition(threading.Lock())
        # The calls being handled, one item each: deque.append and pop are
        # atomic, so counting takes no lock on the per-call path.
        self._handling: collections.deque[None] = collections.deque()
        self._stopping = False
        self._stopped = threading.Event()

    def start(self) -> None:
        """Register health and reflection, then accept calls."""
        if self._started:
            return
        if not self._ports:
            raise RuntimeError("bind() an address before start()")
        names = list(self.service_names)
        if self.health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc_server)
            for name in names:
                self.health.set(name, _SERVING)
            names.append(health.SERVICE_NAME)
        if self.config.reflection:
            names.extend(_reflection.SERVICE_NAMES)
            _reflection.enable_reflection(names, self._grpc_server)
        self._grpc_server.start()
        self._started = True
        _heap.hold()  # freed connection memory goes back to the OS

    def set_serving(self, service: str, serving: bool) -> None:
        """Report ``service`` ("" for the whole server) as SERVING or NOT_SERVING."""
        if self.health is not None:
            self.health.set(service, _SERVING if serving else _NOT_SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop; blocks until done. Safe to call more than once.

        Health turns NOT_SERVING for every service and, after
        ``drain_delay`` (time for health-watching clients to move away),
        calls that still arrive are refused unrun (UNAVAILABLE with the
        never-ran marker, so clients send them elsewhere, whatever the
        method) while accepted calls finish. Once they have, grpc sends
        GOAWAY and closes; whatever is left after ``grace`` seconds
        (default ``config.grace_period``) is cancelled.
        """
        with self._idle:
            if self._stopping:
                first = False
            else:
                self._stopping = first = True
        if not first:
            self._stopped.wait()
            return
        grace = self.config.grace_period if grace is None else grace
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        if self.config.drain_delay and self._started and grace > 0:  # stop(0): at once
            time.sleep(self.config.drain_delay)
        drain = self._drain = Drain(time.monotonic(), grace)
        self._executor.refuse_late()
        self._refusing = True
        with self._idle:
            # Polled: a queued call leaves the queue without telling anyone.
            while not drain.over(time.monotonic(), bool(self._handling or self._executor.queued())):
                self._idle.wait(Drain.POLL)
        left = drain.grace_left(time.monotonic())
        stopped = self._grpc_server.stop(left)
        if self.health is not None:
            self.health.close()
        stopped.wait(left + _CANCEL_WAIT)
        self._executor.shutdown(wait=False)  # a handler grpc could not cancel may still run: not waited for
        if self._started:
            _heap.unhold()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if ``timeout`` passed first."""
        return self._stopped.wait(timeout)

    def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        """Start, block until SIGTERM or SIGINT, then drain and stop.

        Must be called from the main thread (signal handlers live there).
        """
        stop_requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop_requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if on_ready is not None:
                on_ready()
            # Event.wait with a timeout stays interruptible by signals.
            while not stop_requested.wait(0.5):
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the one per-call wrapper -------------------------------------------

    @property
    def inflight(self) -> int:
        """Calls of added services being handled now."""
        return len(self._handling)

    def _leave(self) -> None:
        self._handling.pop()
        if self._stopping and not self._handling:  # only stop() waits on it (and polls besides)
            with self._idle:
                self._idle.notify_all()

    def _fail(self, exc: Exception, context: grpc.ServicerContext, method: str) -> NoReturn:
        if is_grpc_abort(exc, context):
            raise exc
        code, details, trailing = status_for_exception(exc, self.config, method)
        if trailing:
            context.set_trailing_metadata(trailing)
        context.abort(code, details)
        raise AssertionError("unreachable: abort() raises")  # pragma: no cover

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        server, leave, fail, observer = self, self._leave, self._fail, self._observer
        enter = self._handling.append
        cap = self.config.max_deadline
        set_scope, reset_scope = scope_var.set, scope_var.reset
        guard = self._guard_for(method)  # auth check; None (free) without ServerConfig.auth
        watch, reads, now = self._stalls, handler.request_streaming, time.monotonic
        governor = self.governor
        limiters = governor.rate_limiters(method)  # () without ServerConfig.rate_limits
        admission = governor.admission(method, handler.response_streaming or reads)  # None: streams, or off
        # A unary request is registered as a request stream of which the
        # wrapper reads the one message itself (see _one_request).
        one = not reads
        small = response_threshold(self.config)  # None unless the server compresses responses
        if handler.response_streaming:
            behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if server._refusing and _arrived_late():
                    context.abort(*_refusal(context, server._drain))
                if guard is not None and (denied := guard(context)) is not None:
                    context.abort(*denied)
                if limiters and (refused := governor.limit(limiters, context)) is not None:
                    _end_unrun(context, refused)
                if one:
                    request = _one_request(request, context)
                if type(request) is BadRequest:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
                info = None if observer is None else _received(observer, method, context, request)
                enter(None)
                scope = _Scope(context, cap)
                token = set_scope(scope)
                stall = watch.open(context, method)
                if reads:
                    request = watched_requests(request, context, stall)
                try:
                    for response in behaviour(request, context):
                        if small is not None and is_small(response, small):
                            context.disable_next_message_compression()
                        stall.writing = now()  # grpc resumes this generator once the client took the message
                        yield response
                        if stall.fired:
                            return  # the watch ended the call
                        stall.writing = 0.0
                except Exception as exc:
                    fail(exc, context, method)
                finally:
                    watch.close(stall)
                    _end_scope(scope, token)
                    leave()
                    if info is not None:
                        observe_finished(observer, info, sys.exc_info()[1])  # type: ignore[arg-type]

            return handler._replace(request_streaming=True, unary_stream=None, stream_stream=streaming)

        behaviour = watch_reads(handler.stream_unary, watch, method) if reads else handler.unary_unary

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            if server._refusing and _arrived_late():
                context.abort(*_refusal(context, server._drain))
            if guard is not None and (denied := guard(context)) is not None:
                context.abort(*denied)
            if limiters and (refused := governor.limit(limiters, context)) is not None:
                _end_unrun(context, refused)
            started = 0.0 if admission is None else now()
            if admission is not None and (rejected := admission.begin(started, context)) is not None:
                _end_unrun(context, governor.refusal(rejected))
            try:  # admitted: the admission hears of the call's end, however it ends
                if one:  # _one_request inline (one call less per call)
                    request = next(request, None)
                    if request is None:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST)
                if type(request) is BadRequest:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
                info = None if observer is None else _received(observer, method, context, request)
                enter(None)
                scope = _Scope(context, cap)
                token = set_scope(scope)
                try:
                    response = behaviour(request, context)
                    if small is not None and is_small(response, small):
                        context.disable_next_message_compression()
                    if info is not None:
                        info.response = response
                    return response
                except Exception as exc:
                    fail(exc, context, method)
                finally:
                    scope.ended = True
                    reset_scope(token)  # this thread's own call: _end_scope's guard is not needed
                    leave()
                    if info is not None:
                        observe_finished(observer, info, sys.exc_info()[1])  # type: ignore[arg-type]
            finally:
                if admission is not None:
                    admission.end(started, now())

        return handler._replace(request_streaming=True, unary_unary=None, stream_unary=unary)
