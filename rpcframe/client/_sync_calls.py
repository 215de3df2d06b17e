"""The sync front's call objects: drivers of :mod:`._flow` for threads.

``_drive`` runs a unary flow on the calling thread; :class:`ResponseStream`
advances a streaming flow as the caller iterates; :class:`Future` advances
a flow from grpc's callbacks (``future()`` and client-streaming calls).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..balancing.endpoint import SUCCESS, EndpointStats, Outcome
from ..errors import Cancelled
from . import _sync_unary
from ._common import CallPlan, Metadata, MethodBase
from ._flow import (
    CALL,
    CANCEL,
    DELIVER,
    OPEN,
    PICK,
    SLEEP,
    START,
    WAIT,
    Flow,
    details_of,
    status_of,
    trailers_of,
    unary_flow,
)
from ._sync_unary import Cancellable, LeanSyncUnary

__all__ = ["Future", "ResponseStream", "direct", "drive"]



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
    handle = stats.handle
    mc = handle.calls.get(method) or handle.call(method)
    scope = plan.scope
    try:
        if scope is None:
            return True, (mc.with_call if with_call else mc)(
                request, plan.timeout, plan.metadata, plan.credentials, plan.wait_for_ready, plan.compression
            )
        if (type(mc) is LeanSyncUnary and not with_call and plan.credentials is None and plan.compression is None
                and _sync_unary.available):  # fmt: skip
            # Blocking on this thread, cancellable by the incoming call (no hop through grpc's future).
            cancel = Cancellable()
            scope.track(cancel)
            try:
                return True, mc(request, plan.timeout, plan.metadata, None, plan.wait_for_ready, None, cancel=cancel)
            finally:
                scope.untrack(cancel)
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


#: What grpcio itself sends to ask its core to compress a call's messages (grpc._compression).
_COMPRESSION_REQUEST = "grpc-internal-encoding-request"
_ALGORITHMS = {
    grpc.Compression.Gzip: "gzip",
    grpc.Compression.Deflate: "deflate",
    grpc.Compression.NoCompression: "identity",
}


def _stream_compression(plan: CallPlan) -> CallPlan:
    """``plan`` with its compression as metadata: grpcio 1.85's stream-unary ``future()`` drops ``compression=``.

    Its initial metadata is built from the caller's metadata rather than the
    compression-augmented one; carried in the metadata, the request survives.
    """
    assert plan.compression is not None
    header = (_COMPRESSION_REQUEST, _ALGORITHMS[plan.compression])
    metadata = (*plan.metadata, header) if plan.metadata else (header,)
    return plan._replace(metadata=metadata, compression=None)


def _open(method: MethodBase, stats: EndpointStats, done: Any, plan: CallPlan, request: Any) -> Any:
    """Start a streaming call; its pick is released when it ends."""
    mc = stats.handle.call(method)
    if method.kind == "stream_unary" and plan.compression is not None:
        plan = _stream_compression(plan)
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


def direct(method: MethodBase, plan: CallPlan, request: Any, with_call: bool = False) -> Any:
    """A unary call on the fast path (:attr:`MethodBase._direct`): its first attempt without a flow.

    Picks and sends as :func:`drive` does for ``unary_flow``'s first PICK
    and CALL, and reports an answer as the flow would; anything else (a
    failure, an exception) resumes the flow at that CALL, which decides.
    A pick that raises ends the call as it ends an unobserved flow.
    """
    channel: Any = method._channel
    stats, done = channel._pick(plan.wait_for_ready, plan.deadline, None)
    start = time.perf_counter()
    reply: Any = None
    error: BaseException | None = None
    try:
        reply = _call(method, stats, plan, request, with_call)
    except BaseException as exc:
        error = exc
    else:
        if reply[0]:
            done(SUCCESS, time.perf_counter() - start)
            return reply[1]
    flow = unary_flow(method, plan, (stats, done, start))
    flow.send(None)  # to the CALL performed above
    return drive(method, flow, request, with_call, reply, error)


def drive(method: MethodBase, flow: Flow, request: Any, with_call: bool = False, reply: Any = None,
          error: BaseException | None = None) -> Any:  # fmt: skip
    """Run a unary flow to its end on this thread (first sending it ``reply``, or throwing ``error``)."""
    channel: Any = method._channel
    hedges: _Hedges | None = None
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
        channel: Any = self._method._channel
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


class Future(grpc.Future, grpc.Call):  # type: ignore[misc]
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
        channel: Any = self._method._channel
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
            return trailers_of(error)
        return self._call.trailing_metadata()  # type: ignore[no-any-return]

    def code(self) -> grpc.StatusCode:
        """The call's status code (blocks until the call ends)."""
        return status_of(self.exception())

    def details(self) -> str:
        """The call's status details (blocks until the call ends)."""
        return details_of(self.exception())
