"""The asyncio front's call object: a driver of :mod:`._flow` for asyncio.

A :class:`Call` performs the flow's non-blocking steps at once (the first
attempt is sent when the stub method is called, as grpc.aio does) and
awaits the rest when the call is awaited or iterated; no task is created
per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import grpc
import grpc.aio

from ..balancing.endpoint import SUCCESS, EndpointStats, Outcome
from ..balancing.pickers import NoEndpointError, Pick
from ..errors import Cancelled, Unavailable, from_grpc
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

__all__ = ["Call"]


_AWAIT = -1  # the driver's own step: await the attempt a CALL started


def _send(method: MethodBase, stats: EndpointStats, plan: CallPlan, request: Any) -> Any:
    handle = stats.handle
    call = (handle.calls.get(method) or handle.call(method))(
        request, timeout=plan.timeout, metadata=plan.metadata, credentials=plan.credentials,
        wait_for_ready=plan.wait_for_ready, compression=plan.compression,
    )  # fmt: skip
    if plan.scope is not None:
        plan.scope.track(call)
    return call


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Hedges:
    """The running copies of one hedged call: done-callbacks and one timer wake the driver."""

    def __init__(self, scope: Any) -> None:
        self.scope = scope
        self.ended: set[Any] = set()
        self._wakeup: asyncio.Future[None] | None = None

    def start(self, call: Any) -> Any:
        call.add_done_callback(self._ended)
        return call

    def _ended(self, call: Any) -> None:
        self.ended.add(call)
        if self._wakeup is not None:
            _wake(self._wakeup)

    async def wait(self, calls: list[Any], seconds: float | None) -> list[tuple[Any, bool, Any]]:
        if not self.ended.intersection(calls):
            loop = asyncio.get_running_loop()
            self._wakeup = wakeup = loop.create_future()
            timer = None if seconds is None else loop.call_later(seconds, _wake, wakeup)
            try:
                await wakeup
            finally:
                self._wakeup = None
                if timer is not None:
                    timer.cancel()
        return [(call, *await _outcome(call, self.scope)) for call in calls if call in self.ended]


async def _outcome(call: Any, scope: Any) -> tuple[bool, Any]:
    """An ended (or ending) attempt as the flow's (ok, value)."""
    if scope is not None:
        scope.untrack(call)
    if call.cancelled():
        return False, Cancelled("cancelled")
    try:
        return True, await call
    except grpc.RpcError as exc:
        return False, exc


class Call:
    """An asyncio call in flight; awaiting or iterating it raises rpcframe errors.

    Depending on the method kind it is awaitable (unary response), async
    iterable (streaming response), and has ``write``/``done_writing``
    (streaming request without an iterator). Its status and metadata are
    those of the attempt that ended it.
    """

    __slots__ = (
        "_call", "_cancelled", "_delivered", "_driving", "_ended", "_first", "_flow", "_hedges", "_method",
        "_outcome", "_pending", "_request",
    )  # fmt: skip

    def __init__(self, method: MethodBase, flow: Flow | None, request: Any, plan: CallPlan | None = None) -> None:
        """Start the call: ``flow``'s first steps, or without a flow the fast path's first attempt of ``plan``."""
        self._method, self._flow, self._request = method, flow, request
        self._call: Any = None
        self._pending: tuple[Any, ...] | None = None
        self._outcome: tuple[bool, Any] | None = None
        self._hedges: _Hedges | None = None
        self._cancelled = self._delivered = self._driving = False
        self._ended: asyncio.Event | None = None
        #: The fast path's first attempt in flight, (plan, stats, done, start); None once settled or handed over.
        self._first: tuple[CallPlan, EndpointStats, Any, float] | None = None
        if flow is None:
            self._start(plan)  # type: ignore[arg-type]
        else:
            self._step(None, None)

    def __del__(self) -> None:
        first = self._first
        if first is not None:  # dropped unawaited: release the pick, as closing the flow at its CALL would
            first[2](Outcome.IGNORED, time.perf_counter() - first[3])

    # -- the fast path (MethodBase._direct): a unary call's first attempt without a flow --------

    def _start(self, plan: CallPlan) -> None:
        """Pick and send as :meth:`_step` does for ``unary_flow``'s first PICK and CALL (:meth:`_pick_now`,
        :func:`_send`, inlined: once per call)."""
        method = self._method
        channel = method._channel
        try:
            stats, done = channel._pick_now(plan.wait_for_ready, None)
        except NoEndpointError:
            if not plan.wait_for_ready:
                return self._end((False, Unavailable(channel.balancer.reason)))
            self._flow = flow = unary_flow(method, plan)
            self._pending = flow.send(None)  # its first PICK, awaited
            return None
        except BaseException as exc:  # as it ends an unobserved flow
            return self._end((False, exc))
        start = time.perf_counter()
        handle = stats.handle
        try:
            self._call = call = (handle.calls.get(method) or handle.call(method))(
                self._request, timeout=plan.timeout, metadata=plan.metadata, credentials=plan.credentials,
                wait_for_ready=plan.wait_for_ready, compression=plan.compression,
            )  # fmt: skip
            if plan.scope is not None:
                plan.scope.track(call)
        except BaseException as exc:
            done(Outcome.IGNORED, time.perf_counter() - start)
            return self._end((False, exc))
        self._pending = (_AWAIT, plan.scope)
        self._first = (plan, stats, done, start)
        return None

    async def _direct(self) -> Any:
        """Await the first attempt; its answer is reported here, anything else resumes the flow (as :meth:`_run`)."""
        call, first = self._call, self._first
        plan, _, done, start = first  # type: ignore[misc]
        if plan.scope is not None:
            plan.scope.untrack(call)
        self._driving = True
        try:
            reply: Any = None
            error: BaseException | None = None
            if call.cancelled():
                reply = (False, Cancelled("cancelled"))
            else:
                try:
                    response = await call
                except grpc.RpcError as exc:
                    reply = (False, exc)
                except asyncio.CancelledError as exc:
                    if not self._cancelled and self._first is first:
                        self._resume()
                        self._step(None, exc)  # the awaiting task was cancelled: the flow lets go first
                        raise
                    if self._first is not first:  # another awaiter of this call took it over meanwhile
                        raise
                    error = self._cancellation()
                except BaseException as exc:
                    error = exc
                else:
                    if not self._cancelled and self._first is first:
                        self._first = None
                        done(SUCCESS, time.perf_counter() - start)
                        self._outcome, self._pending = (True, response), None  # self._end(), inlined
                        if self._ended is not None:
                            self._ended.set()
                        return response
                    reply = (True, response)
            if self._first is not first:  # another awaiter of this call settled it or took it over meanwhile
                return await self._joined()
            if self._cancelled and error is None:
                error = self._cancellation()
            self._resume()
            self._step(reply, error)
            return await self._awaited()
        finally:
            self._driving = False

    async def _joined(self) -> Any:
        """The outcome of a call another awaiter (of the same call object) drives: once it ends."""
        await self._settled()
        ok, value = self._outcome  # type: ignore[misc]
        if ok:
            return value
        raise value

    def _resume(self) -> None:
        """Hand the call to ``unary_flow``, primed at the first attempt's CALL (already sent)."""
        plan, stats, done, start = self._first  # type: ignore[misc]
        self._first = None
        self._flow = flow = unary_flow(self._method, plan, (stats, done, start))
        flow.send(None)

    # -- the driver ---------------------------------------------------------

    def _step(self, reply: Any, error: BaseException | None) -> None:
        """Perform the flow's non-blocking actions; stop at one that must be awaited."""
        flow: Any = self._flow
        while True:
            try:
                action = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as stop:
                return self._end((True, stop.value))
            except BaseException as exc:
                return self._end((False, exc))
            reply = error = None
            kind = action[0]
            try:
                if kind is PICK:
                    reply = self._pick_now(action[1], action[2])
                elif kind is CALL:
                    self._call = _send(self._method, action[1], action[2], self._request)
                    self._pending = (_AWAIT, action[2].scope)
                    return None
                elif kind is START:
                    self._hedges = self._hedges or _Hedges(action[2].scope)
                    reply = self._call = self._hedges.start(_send(self._method, action[1], action[2], self._request))
                elif kind is OPEN:
                    reply = self._call = _open(self._method, action[1], action[2], action[3], self._request)
                elif kind is CANCEL:
                    for call in action[1]:
                        call.cancel()
                        if self._hedges is not None and self._hedges.scope is not None:
                            self._hedges.scope.untrack(call)
                else:  # SLEEP, WAIT, DELIVER, or a PICK that must wait
                    self._pending = action
                    return None
            except _MustWait:
                self._pending = action
                return None
            except BaseException as exc:
                error = exc

    def _pick_now(self, plan: CallPlan, avoid: Any) -> Pick:
        channel = self._method._channel
        try:
            return channel._pick_now(plan.wait_for_ready, avoid)
        except NoEndpointError:
            if not plan.wait_for_ready:
                raise Unavailable(channel.balancer.reason) from None
            raise _MustWait from None

    def _end(self, outcome: tuple[bool, Any]) -> None:
        self._outcome, self._pending = outcome, None
        if self._ended is not None:
            self._ended.set()

    async def _perform(self, action: tuple[Any, ...]) -> Any:
        """Perform an action that waits."""
        kind = action[0]
        if kind is _AWAIT:
            return await _outcome(self._call, action[1])
        if kind is WAIT:
            return await self._hedges.wait(action[1], action[2])  # type: ignore[union-attr]
        if kind is SLEEP:
            await asyncio.sleep(action[1])
        elif kind is PICK:
            plan = action[1]
            channel: Any = self._method._channel
            return await channel._pick_waiting(plan.wait_for_ready, plan.deadline, action[2])
        return None

    async def _run(self) -> Any:
        """Drive the flow to its end, or to its next DELIVER; return or raise its outcome."""
        if self._first is not None:
            return await self._direct()
        self._driving = True
        try:
            while self._pending is not None and self._pending[0] is not DELIVER:
                error: BaseException | None = None
                try:
                    reply = await self._perform(self._pending)
                except asyncio.CancelledError as exc:
                    if not self._cancelled:
                        self._step(None, exc)  # the awaiting task was cancelled: the flow lets go first
                        raise
                    reply, error = None, self._cancellation()
                except BaseException as exc:
                    reply, error = None, exc
                if self._cancelled and error is None:
                    error = self._cancellation()
                self._step(reply, error)
        finally:
            self._driving = False
        if self._outcome is None:
            return None
        ok, value = self._outcome
        if ok:
            return value
        raise value

    def _cancellation(self) -> Cancelled:
        return Cancelled(f"{self._method.method}: cancelled")

    def __await__(self) -> Generator[Any, None, Any]:
        return (self._awaited() if self._first is None else self._direct()).__await__()

    async def _awaited(self) -> Any:
        result = await self._run()
        if self._pending is None:
            return result
        # A client-streaming call at its DELIVER: its one response.
        try:
            response, failed = await self._call, None
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
            response, failed = None, self._cancellation()
        except grpc.RpcError as exc:
            response, failed = None, exc
        self._step((False, failed), None)
        await self._run()
        return response

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        await self._run()  # up to the stream's first DELIVER
        while self._pending is not None:
            try:
                async for response in self._call:
                    self._delivered = True
                    yield response
                failed = None
            except asyncio.CancelledError:
                if not self._cancelled:
                    raise
                failed = self._cancellation()
            except grpc.RpcError as exc:
                failed = exc
            self._step((self._delivered, failed), None)
            await self._run()

    async def _settled(self) -> None:
        """Wait for the call's end without raising (for status and metadata)."""
        if self._outcome is not None or self._pending is None or self._pending[0] is DELIVER:
            return
        if self._ended is None:
            self._ended = asyncio.Event()
        if self._driving:
            await self._ended.wait()
            return
        try:
            await self._run()
        except Exception:  # noqa: BLE001 - the status is what was asked for
            pass

    # -- grpc.aio.Call --------------------------------------------------------

    async def read(self) -> Any:
        """The next response, or ``grpc.aio.EOF`` after the last one."""
        return await self._grpc(self._call.read())

    async def write(self, request: Any) -> None:
        """Send one request on a request stream."""
        await self._grpc(self._call.write(request))

    async def done_writing(self) -> None:
        """Close the request stream."""
        await self._grpc(self._call.done_writing())

    async def wait_for_connection(self) -> None:
        """Wait until the call is sent (raises if it failed first)."""
        await self._grpc(self._call.wait_for_connection())

    async def _grpc(self, operation: Any) -> Any:
        try:
            return await operation
        except asyncio.CancelledError:
            if not self._cancelled:
                raise
            raise self._cancellation() from None
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    def cancel(self) -> bool:
        """Cancel the call; the server sees CANCELLED, and the caller gets :class:`rpcframe.Cancelled`."""
        if self.done():
            return False
        self._cancelled = True
        return self._call is None or bool(self._call.cancel())

    def cancelled(self) -> bool:
        """Whether the call was cancelled."""
        return self._cancelled

    def done(self) -> bool:
        """Whether the call has ended."""
        return self._outcome is not None or (self._call is not None and bool(self._call.done()))

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline, or None without one."""
        return None if self._call is None else self._call.time_remaining()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Run ``callback(call)`` when the call's current attempt ends."""
        if self._call is None:
            asyncio.ensure_future(self._settled()).add_done_callback(lambda _: callback(self))
        else:
            self._call.add_done_callback(lambda _: callback(self))

    async def initial_metadata(self) -> Metadata:
        """Metadata the server sent before its first response."""
        await self._settled()
        return () if self._call is None else await self._call.initial_metadata()

    async def trailing_metadata(self) -> Metadata:
        """Metadata the server sent with its status."""
        await self._settled()
        error = self._error()
        if error is not None:
            return trailers_of(error)
        return await self._call.trailing_metadata()  # type: ignore[no-any-return]

    async def code(self) -> grpc.StatusCode:
        """The call's final status code."""
        await self._settled()
        if self._outcome is None:
            return await self._call.code()
        return status_of(self._error())

    async def details(self) -> str:
        """The call's final status details."""
        await self._settled()
        if self._outcome is None:
            return await self._call.details()  # type: ignore[no-any-return]
        return details_of(self._error())

    def _error(self) -> BaseException | None:
        return None if self._outcome is None or self._outcome[0] else self._outcome[1]


class _MustWait(Exception):
    """The action cannot be done without waiting: the driver awaits it."""


def _open(method: MethodBase, stats: EndpointStats, done: Any, plan: CallPlan, request: Any) -> Any:
    """Start a streaming call; its pick is released when it ends."""
    call = _send(method, stats, plan, request)
    # Streams count as in-flight while open; their length says nothing about
    # the endpoint's latency, so they neither age nor feed the EWMA.
    stats.as_stream()
    scope = plan.scope

    def ended(_: Any) -> None:
        done(Outcome.IGNORED, -1.0)
        if scope is not None:
            scope.untrack(call)

    call.add_done_callback(ended)
    return call
