"""The sync client front: a ``grpc.Channel`` whose calls go through rpcframe.

This front is a driver of :mod:`._flow`: it performs what the flow asks by
blocking the calling thread (``_drive``), by iterating a response stream
(:class:`ResponseStream`), or from grpc's callbacks (:class:`_Future`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from ..balancing.balancer import BalancerCore, Connectivity, EndpointEntry
from ..balancing.endpoint import Endpoint, EndpointStats, Outcome
from ..balancing.pickers import NoEndpointError, Pick
from ..config import ChannelConfig
from ..errors import Cancelled, DeadlineExceeded, Unavailable
from ._common import (
    HEALTH_BACKOFF,
    BalancedChannelBase,
    CallPlan,
    Metadata,
    MethodBase,
    SubchannelBase,
    Target,
    connectivity_of,
)
from ._flow import CALL, CANCEL, DELIVER, OPEN, PICK, SLEEP, START, WAIT, Flow, hedged_flow, stream_flow, unary_flow

__all__ = ["Channel", "ResponseStream", "connect"]

# grpc_connectivity_state values as the cygrpc channel reports them.
_CY_STATES = {state.value[0]: state for state in grpc.ChannelConnectivity}
_CY_READY = grpc.ChannelConnectivity.READY.value[0]
_POLL_EXIT = 10.0  # seconds to wait for grpc's connectivity thread (it polls every 0.2 s; slow under load)


def _args(plan: CallPlan) -> tuple[Any, ...]:
    return plan.timeout, plan.metadata, plan.credentials, plan.wait_for_ready, plan.compression


def _cancelled(method: MethodBase) -> Cancelled:
    return Cancelled(f"{method.method}: cancelled")


def _outcome(method: MethodBase, future: Any, with_call: bool) -> tuple[bool, Any]:
    """An ended grpc future as the flow's (ok, value)."""
    if future.cancelled():
        return False, _cancelled(method)
    exc = future.exception()
    if exc is not None:
        return False, exc
    return True, (future.result(), future) if with_call else future.result()


def _call(method: MethodBase, stats: EndpointStats, plan: CallPlan, request: Any, with_call: bool) -> tuple[bool, Any]:
    """One blocking attempt; cancellable from the incoming call when sent while handling one."""
    mc = stats.handle.call(method)
    scope = plan.scope
    try:
        if scope is None:
            return True, (mc.with_call if with_call else mc)(request, *_args(plan))
        future = mc.future(request, *_args(plan))
        scope.track(future)
        try:
            future.result()
        finally:
            scope.untrack(future)
        return _outcome(method, future, with_call)
    except grpc.RpcError as exc:
        return False, exc
    except grpc.FutureCancelledError:
        raise Cancelled(f"{method.method}: cancelled with the incoming call") from None


def _open(method: MethodBase, stats: EndpointStats, done: Any, plan: CallPlan, request: Any) -> Any:
    """Start a streaming call; its pick is released when it ends."""
    mc = stats.handle.call(method)
    call = (mc.future if method.kind == "stream_unary" else mc)(request, *_args(plan))
    # Streams count as in-flight while open; their length says nothing about
    # the endpoint's latency, so they neither age nor feed the EWMA.
    stats.as_stream()
    scope = plan.scope

    def ended(*_: Any) -> None:
        done(Outcome.IGNORED, -1.0)
        if scope is not None:
            scope.untrack(call)

    if scope is not None:
        scope.track(call)
    if method.kind == "stream_unary":
        call.add_done_callback(ended)
    elif not call.add_callback(ended):
        ended()
    return call


class _Hedges:
    """The running copies of one hedged call, and the event that says one ended."""

    def __init__(self, scope: Any) -> None:
        self.changed = threading.Event()
        self.scope = scope

    def start(self, method: MethodBase, stats: EndpointStats, plan: CallPlan, request: Any) -> Any:
        future = stats.handle.call(method).future(request, *_args(plan))
        if self.scope is not None:
            self.scope.track(future)
        future.add_done_callback(lambda _: self.changed.set())
        return future

    def wait(self, method: MethodBase, futures: list[Any], timeout: float | None,
             with_call: bool) -> list[tuple[Any, bool, Any]]:  # fmt: skip
        self.changed.wait(timeout)
        self.changed.clear()
        ended = [f for f in futures if f.done()]
        self.untrack(ended)
        return [(f, *_outcome(method, f, with_call)) for f in ended]

    def cancel(self, futures: list[Any]) -> None:
        for future in futures:
            future.cancel()
        self.untrack(futures)

    def untrack(self, futures: list[Any]) -> None:
        if self.scope is not None:
            for future in futures:
                self.scope.untrack(future)


def _drive(method: MethodBase, flow: Flow, request: Any, with_call: bool = False) -> Any:
    """Run a unary flow to its end on this thread."""
    channel: Channel = method._channel  # type: ignore[assignment]
    hedges: _Hedges | None = None
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            action = flow.send(reply) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value
        reply = error = None
        kind = action[0]
        try:
            if kind is CALL:
                reply = _call(method, action[1], action[2], request, with_call)
            elif kind is PICK:
                plan = action[1]
                reply = channel._pick(plan.wait_for_ready, plan.deadline, action[2])
            elif kind is SLEEP:
                time.sleep(action[1])
            elif kind is START:
                hedges = hedges or _Hedges(action[2].scope)
                reply = hedges.start(method, action[1], action[2], request)
            elif kind is WAIT:
                reply = hedges.wait(method, action[1], action[2], with_call)  # type: ignore[union-attr]
            elif kind is CANCEL:
                hedges.cancel(action[1])  # type: ignore[union-attr]
        except BaseException as exc:  # the flow releases what it holds, then re-raises
            error = exc


class ResponseStream(grpc.Call):  # type: ignore[misc]
    """A streaming call's responses; iteration raises rpcframe errors.

    A server stream that fails before its first response is restarted on
    another endpoint when the retry policy allows (the flow decides).
    """

    __slots__ = ("_call", "_delivered", "_flow", "_method", "_request")

    def __init__(self, method: MethodBase, flow: Flow, request: Any) -> None:
        self._method, self._flow, self._request = method, flow, request
        self._call: Any = None
        self._delivered = False
        self._advance(None)

    def _advance(self, reply: Any) -> None:
        """Perform the flow's actions up to its next DELIVER (StopIteration when it ends)."""
        channel: Channel = self._method._channel  # type: ignore[assignment]
        error: BaseException | None = None
        while True:
            try:
                action = self._flow.send(reply) if error is None else self._flow.throw(error)
            except StopIteration:
                raise StopIteration from None
            reply = error = None
            kind = action[0]
            try:
                if kind is DELIVER:
                    self._delivered = False
                    return
                if kind is OPEN:
                    reply = self._call = _open(self._method, action[1], action[2], action[3], self._request)
                elif kind is PICK:
                    reply = channel._pick(action[1].wait_for_ready, action[1].deadline, action[2])
                elif kind is SLEEP:
                    time.sleep(action[1])
            except BaseException as exc:
                error = exc

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                response = next(self._call)
            except grpc.RpcError as exc:
                self._advance((self._delivered, exc))
                continue
            except StopIteration:
                self._advance((self._delivered, None))
                raise
            self._delivered = True
            return response

    def cancel(self) -> bool:
        """Cancel the call; the server sees CANCELLED."""
        return bool(self._call.cancel())

    def is_active(self) -> bool:
        """Whether the call is still running."""
        return bool(self._call.is_active())

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline, or None without one."""
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call ends."""
        return bool(self._call.add_callback(callback))

    def initial_metadata(self) -> Metadata:
        """Metadata the server sent before its first response (blocks)."""
        return self._call.initial_metadata()  # type: ignore[no-any-return]

    def trailing_metadata(self) -> Metadata:
        """Metadata the server sent with its status (blocks until the end)."""
        return self._call.trailing_metadata()  # type: ignore[no-any-return]

    def code(self) -> grpc.StatusCode:
        """The call's final status code (blocks until the end)."""
        return self._call.code()

    def details(self) -> str:
        """The call's final status details (blocks until the end)."""
        return self._call.details()  # type: ignore[no-any-return]


class _Future(grpc.Future, grpc.Call):  # type: ignore[misc]
    """A call running in the background: its flow advances in grpc's callbacks.

    ``result()`` returns the response or raises an rpcframe error (a
    cancelled call raises :class:`rpcframe.Cancelled`); the call's status
    and metadata are those of the attempt that ended it.
    """

    def __init__(self, method: MethodBase, flow: Flow, request: Any) -> None:
        self._method, self._flow, self._request = method, flow, request
        self._call: Any = None
        self._ended = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._callbacks: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()
        self._advance(None, None)

    def _advance(self, reply: Any, error: BaseException | None) -> None:
        channel: Channel = self._method._channel  # type: ignore[assignment]
        while True:
            try:
                action = self._flow.send(reply) if error is None else self._flow.throw(error)
            except StopIteration as stop:
                return self._finish(stop.value, None)
            except BaseException as exc:
                return self._finish(None, exc)
            reply = error = None
            kind = action[0]
            try:
                if kind is PICK:
                    reply = channel._pick(action[1].wait_for_ready, action[1].deadline, action[2])
                elif kind is CALL:
                    mc = action[1].handle.call(self._method)
                    self._call = mc.future(self._request, *_args(action[2]))
                    return self._resume_on(self._call, action[2])
                elif kind is OPEN:
                    reply = self._call = _open(self._method, action[1], action[2], action[3], self._request)
                elif kind is DELIVER:
                    return self._resume_on(self._call, None)
                elif kind is SLEEP:
                    threading.Timer(action[1], self._advance, (None, None)).start()
                    return None
            except BaseException as exc:
                error = exc

    def _resume_on(self, future: Any, plan: CallPlan | None) -> None:
        scope = None if plan is None else plan.scope
        if scope is not None:
            scope.track(future)

        def ended(f: Any) -> None:
            if scope is not None:
                scope.untrack(f)
            ok, value = _outcome(self._method, f, False)
            if plan is None:  # a DELIVER: the stream's response is the call's
                self._value = value if ok else None
                self._advance((False, None if ok else value), None)
            elif f.cancelled():
                self._advance(None, value)
            else:
                self._advance((ok, value), None)

        future.add_done_callback(ended)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        if value is None and error is None:
            value = self._value  # a stream-unary flow returns nothing: its response was delivered
        with self._lock:
            self._value, self._error = value, error
            self._ended.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    @property
    def call(self) -> grpc.Call:
        """The call itself (metadata, status)."""
        return self

    def cancel(self) -> bool:
        """Cancel the call; ``result()`` then raises :class:`rpcframe.Cancelled`."""
        if self._ended.is_set() or self._call is None:
            return False
        self._cancelled = True
        return bool(self._call.cancel())

    def cancelled(self) -> bool:
        return self._cancelled and self._ended.is_set()

    def running(self) -> bool:
        return not self._ended.is_set()

    def done(self) -> bool:
        return self._ended.is_set()

    def is_active(self) -> bool:
        return not self._ended.is_set()

    def result(self, timeout: float | None = None) -> Any:
        if not self._ended.wait(timeout):
            raise grpc.FutureTimeoutError()
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._ended.wait(timeout):
            raise grpc.FutureTimeoutError()
        return self._error

    def traceback(self, timeout: float | None = None) -> Any:
        error = self.exception(timeout)
        return None if error is None else error.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._ended.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.add_done_callback(lambda _: callback())
        return True

    def time_remaining(self) -> float | None:
        return None if self._call is None else self._call.time_remaining()

    def _ended_call(self) -> Any:
        self._ended.wait()
        return self._call

    def initial_metadata(self) -> Metadata:
        """Metadata the server sent first (blocks until the call ends)."""
        call = self._ended_call()
        return () if call is None else call.initial_metadata()

    def trailing_metadata(self) -> Metadata:
        """Metadata the server sent with its status (blocks until the call ends)."""
        error = self.exception()
        if error is not None:
            return tuple(getattr(error, "trailing_metadata", lambda: ())() or ())
        return self._call.trailing_metadata()  # type: ignore[no-any-return]

    def code(self) -> grpc.StatusCode:
        """The call's status code (blocks until the call ends)."""
        error = self.exception()
        if error is None:
            return grpc.StatusCode.OK
        code = getattr(error, "code", None)
        return code() if callable(code) else grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        """The call's status details (blocks until the call ends)."""
        error = self.exception()
        details = getattr(error, "details", None)
        return (details() if callable(details) else "") or ""


class UnaryUnary(MethodBase, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """Unary method: ``stub.Method(request, timeout=..., metadata=...)``."""

    __slots__ = ()
    kind = "unary_unary"

    def __call__(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> Any:  # fmt: skip
        plan = self._prepare(timeout, metadata, credentials, wait_for_ready, compression)
        return _drive(self, self._flow(plan), request)

    def with_call(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                  credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                  compression: grpc.Compression | None = None) -> tuple[Any, grpc.Call]:  # fmt: skip
        """Like calling the method, but also return the call (for metadata)."""
        plan = self._prepare(timeout, metadata, credentials, wait_for_ready, compression)
        return _drive(self, self._flow(plan), request, with_call=True)  # type: ignore[no-any-return]

    def future(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
               credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
               compression: grpc.Compression | None = None) -> grpc.Future:  # fmt: skip
        """Start the call and return a future of its response (retried and failed over like a call)."""
        plan = self._prepare(timeout, metadata, credentials, wait_for_ready, compression)
        return _Future(self, unary_flow(self, plan), request)

    def _flow(self, plan: CallPlan) -> Flow:
        delay = self._hedge_delay(plan.scope)
        return unary_flow(self, plan) if delay is None else hedged_flow(self, plan, delay)


class UnaryStream(MethodBase, grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    """Server-streaming method: returns an iterator of responses."""

    __slots__ = ()
    kind = "unary_stream"

    def __call__(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> ResponseStream:  # fmt: skip
        plan = self._prepare(timeout, metadata, credentials, wait_for_ready, compression)
        return ResponseStream(self, stream_flow(self, plan, retry=True), request)


class StreamUnary(MethodBase, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    """Client-streaming method: takes an iterator of requests (no failover: it cannot be replayed)."""

    __slots__ = ()
    kind = "stream_unary"

    def __call__(self, request_iterator: Iterator[Any], timeout: float | None = None,
                 metadata: Metadata | None = None, credentials: grpc.CallCredentials | None = None,
                 wait_for_ready: bool | None = None, compression: grpc.Compression | None = None) -> Any:  # fmt: skip
        return self.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression).result()

    def with_call(self, request_iterator: Iterator[Any], timeout: float | None = None,
                  metadata: Metadata | None = None, credentials: grpc.CallCredentials | None = None,
                  wait_for_ready: bool | None = None,
                  compression: grpc.Compression | None = None) -> tuple[Any, grpc.Call]:  # fmt: skip
        """Like calling the method, but also return the call (for metadata)."""
        future = self.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return future.result(), future

    def future(self, request_iterator: Iterator[Any], timeout: float | None = None,
               metadata: Metadata | None = None, credentials: grpc.CallCredentials | None = None,
               wait_for_ready: bool | None = None,
               compression: grpc.Compression | None = None) -> grpc.Future:  # fmt: skip
        """Start the call and return a future of its response."""
        plan = self._prepare(timeout, metadata, credentials, wait_for_ready, compression)
        return _Future(self, stream_flow(self, plan, retry=False), request_iterator)


class StreamStream(MethodBase, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    """Bidirectional-streaming method: requests in, an iterator of responses out."""

    __slots__ = ()
    kind = "stream_stream"

    def __call__(self, request_iterator: Iterator[Any], timeout: float | None = None,
                 metadata: Metadata | None = None, credentials: grpc.CallCredentials | None = None,
                 wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> ResponseStream:  # fmt: skip
        plan = self._prepare(timeout, metadata, credentials, wait_for_ready, compression)
        return ResponseStream(self, stream_flow(self, plan, retry=False), request_iterator)


def _cancel_kick(kick: grpc.Future | None) -> None:
    # grpc's ready-future fails when cancelled a second time (its callbacks are gone).
    if kick is not None and not kick.done():
        try:
            kick.cancel()
        except TypeError:
            pass


class _Subchannel(SubchannelBase):
    """One endpoint: a grpc channel, its connectivity, and its health watch."""

    def __init__(self, address: str, core: BalancerCore, config: ChannelConfig) -> None:
        super().__init__(address, grpc, core, config)
        # grpc's sync channel has no public "state now" call (only subscribe);
        # its own connectivity poller asks the cygrpc channel the same way.
        self._cy_channel = self.channel._channel
        self._closed = threading.Event()
        self._kick: grpc.Future | None = None
        self._watch: Any = None
        self.channel.subscribe(self._on_state, try_to_connect=True)
        if config.health_check:
            threading.Thread(target=self._watch_health, daemon=True, name=f"rpcframe-health-{address}").start()

    def ready(self) -> bool:
        return bool(self._cy_channel.check_connectivity_state(False) == _CY_READY)

    def connectivity(self) -> Connectivity:
        state = self._cy_channel.check_connectivity_state(False)
        return connectivity_of(_CY_STATES.get(state, grpc.ChannelConnectivity.IDLE))

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if self._closed.is_set():
            return
        self._core.set_connectivity(self.address, connectivity_of(state))
        if state is grpc.ChannelConnectivity.IDLE:
            # A dropped connection leaves the channel IDLE; reconnect at once
            # so the endpoint returns as soon as its server does.
            self._kick = grpc.channel_ready_future(self.channel)
            if self._closed.is_set():
                _cancel_kick(self._kick)

    def _watch_health(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        backoff = HEALTH_BACKOFF[0]
        while not self._closed.is_set():
            try:
                self._watch = stub.Watch(self._health_request, wait_for_ready=True)
                for response in self._watch:
                    self._health_seen(response)
                    backoff = HEALTH_BACKOFF[0]
            except grpc.RpcError as exc:
                if self._health_gone(exc):
                    return
            except ValueError:
                return  # the channel was closed under us
            self._closed.wait(backoff)
            backoff = min(backoff * 2, HEALTH_BACKOFF[1])

    def close(self) -> None:
        """Stop watching and close the channel (cancels its active calls)."""
        self._closed.set()
        _cancel_kick(self._kick)
        if self._watch is not None:
            self._watch.cancel()
        self.channel.unsubscribe(self._on_state)
        # grpc's connectivity-polling thread wakes every 0.2 s and fails if the
        # channel was closed under it, so close once it has seen the
        # unsubscribe and stopped.
        threading.Thread(target=self._close_channel, daemon=True, name="rpcframe-close").start()

    def _close_channel(self) -> None:
        # A state change delivered during close() may have started a new
        # ready-future; stop it, then wait (bounded) until grpc's polling
        # thread has seen that nobody listens and exited.
        _cancel_kick(self._kick)
        state = getattr(self.channel, "_connectivity_state", None)
        until = time.monotonic() + _POLL_EXIT
        while time.monotonic() < until and (state is None or state.polling):
            time.sleep(0.05)
        self.channel.close()


class Channel(BalancedChannelBase, grpc.Channel):  # type: ignore[misc]
    """A client channel to a service: one grpc channel per endpoint, a pick per call.

    ``target`` is ``host:port``, a comma-separated list, ``dns:///host:port``,
    a list of addresses, or a :class:`~rpcframe.balancing.resolver.Resolver`.
    Pass the channel to a generated stub or use :meth:`stub`; every method of
    the stub is an rpcframe wrapper, so calls are balanced, fail over when
    safe, and raise :mod:`rpcframe.errors` exceptions.
    """

    _kinds = (UnaryUnary, UnaryStream, StreamUnary, StreamStream)

    def __init__(self, target: Target, config: ChannelConfig | None = None) -> None:
        super().__init__(target, config)
        self._changed = threading.Condition()
        self._subscribers: list[Callable[[grpc.ChannelConnectivity], None]] = []
        self._core.add_listener(self._on_picker)
        self._closed = False
        self._resolver.start(self._on_endpoints)

    def _on_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        if self._closed:
            return
        _, removed = self._core.set_endpoints(endpoints, attach=self._attach)
        for entry in removed:
            threading.Thread(target=self._retire, args=(entry,), daemon=True).start()

    def _attach(self, entry: EndpointEntry) -> None:
        entry.stats.handle = _Subchannel(entry.stats.address, self._core, self.config)

    def _retire(self, entry: EndpointEntry) -> None:
        """Close a removed endpoint once its in-flight calls are done."""
        deadline = time.monotonic() + self.config.close_grace
        while entry.stats.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        entry.stats.handle.close()

    def _on_picker(self) -> None:
        with self._changed:
            self._changed.notify_all()
        if self._subscribers:
            state = grpc.ChannelConnectivity[self._core.aggregate().name]
            for callback in list(self._subscribers):
                callback(state)

    def _pick(self, wait_for_ready: bool | None, deadline: float | None, avoid: EndpointStats | None = None) -> Pick:
        try:
            return self._pick_now(wait_for_ready, avoid)
        except NoEndpointError:
            if not wait_for_ready:
                raise Unavailable(self._core.reason) from None
        with self._changed:
            while True:
                try:
                    return self._core.current().pick()
                except NoEndpointError:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise DeadlineExceeded(f"waiting for an endpoint: {self._core.reason}") from None
                    self._changed.wait(remaining)

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        """Be told the target's aggregate connectivity on every change."""
        self._subscribers.append(callback)
        callback(grpc.ChannelConnectivity[self._core.aggregate().name])

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """Stop being told about connectivity changes."""
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until some endpoint is ready; raise :class:`rpcframe.Unavailable` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._core.fallback or not self._core.picker.endpoints:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Unavailable(f"not ready within {timeout}s: {self._core.reason}")
                self._changed.wait(remaining)

    def close(self) -> None:
        """Close every endpoint's channel; active calls are cancelled.

        Returns at once; the connections close in the background within
        about half a second (grpc's connectivity thread must stop first).
        """
        self._closed = True
        self._resolver.close()
        for entry in self._core.entries():
            entry.stats.handle.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(target: Target, config: ChannelConfig | None = None) -> Channel:
    """Open a channel to ``target`` (see :class:`Channel` for target forms)."""
    return Channel(target, config)
