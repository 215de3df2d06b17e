"""The asyncio client front: a ``grpc.aio.Channel`` whose calls go through rpcframe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .._core.deadline import CallScope
from ..balancing.balancer import BalancerCore, Connectivity, EndpointEntry
from ..balancing.endpoint import Endpoint, EndpointStats, Outcome
from ..balancing.pickers import NoEndpointError, Pick
from ..config import ChannelConfig
from ..errors import Cancelled, DeadlineExceeded, RpcError, Unavailable, from_grpc
from ..security.tls import channel_credentials
from ._common import (
    Attempts,
    BalancedChannelBase,
    Metadata,
    MethodBase,
    SubchannelBase,
    Target,
    connectivity_of,
    outcome_of,
    remaining_timeout,
    with_attempt,
)

__all__ = ["Channel", "connect"]

S = TypeVar("S")
_WATCH_END = 1.0  # seconds close() waits for a cancelled health Watch's task to end by itself


class Call:
    """An asyncio call in flight; awaiting or iterating it raises rpcframe errors.

    Depending on the method kind it is awaitable (unary response), async
    iterable (streaming response), and has ``write``/``done_writing``
    (streaming request without an iterator).
    """

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    def __await__(self) -> Generator[Any, None, Any]:
        try:
            return (yield from self._call.__await__())
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    async def _responses(self) -> AsyncIterator[Any]:
        try:
            async for response in self._call:
                yield response
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def read(self) -> Any:
        """The next response, or ``grpc.aio.EOF`` after the last one."""
        try:
            return await self._call.read()
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    async def write(self, request: Any) -> None:
        """Send one request on a request stream."""
        try:
            await self._call.write(request)
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    async def done_writing(self) -> None:
        """Close the request stream."""
        try:
            await self._call.done_writing()
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    async def wait_for_connection(self) -> None:
        """Wait until the call is sent (raises if it failed first)."""
        try:
            await self._call.wait_for_connection()
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    def cancel(self) -> bool:
        """Cancel the call; the server sees CANCELLED."""
        return bool(self._call.cancel())

    def cancelled(self) -> bool:
        """Whether the call was cancelled."""
        return bool(self._call.cancelled())

    def done(self) -> bool:
        """Whether the call has ended."""
        return bool(self._call.done())

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline, or None without one."""
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Run ``callback(call)`` when the call ends."""
        self._call.add_done_callback(lambda _: callback(self))

    async def initial_metadata(self) -> Metadata:
        """Metadata the server sent before its first response."""
        return await self._call.initial_metadata()  # type: ignore[no-any-return]

    async def trailing_metadata(self) -> Metadata:
        """Metadata the server sent with its status."""
        return await self._call.trailing_metadata()  # type: ignore[no-any-return]

    async def code(self) -> grpc.StatusCode:
        """The call's final status code."""
        return await self._call.code()

    async def details(self) -> str:
        """The call's final status details."""
        return await self._call.details()  # type: ignore[no-any-return]


class UnaryCall(Call):
    """A unary-response call: picks, sends, reports the outcome, retries or hedges."""

    __slots__ = ("_args", "_channel", "_done", "_method", "_request", "_scope", "_start", "_stats")

    def __init__(self, method: MethodBase, request: Any, args: tuple[Any, ...], scope: CallScope | None) -> None:
        self._method = method
        self._channel: Channel = method._channel  # type: ignore[assignment]
        self._request = request
        self._args = args  # timeout, metadata, credentials, wait_for_ready, compression
        self._scope = scope
        self._done: Any = None
        if method._hedge_state is not None:
            super().__init__(None)  # hedged calls start when awaited
            return
        try:
            stats, self._done = self._channel._pick_now(args[3])
        except NoEndpointError:
            super().__init__(None)  # nothing to send to yet: wait in __await__
            return
        super().__init__(self._send(stats))

    def _send(self, stats: Any, metadata: Metadata | None = None) -> Any:
        self._stats = stats
        timeout, base_metadata, credentials, wait_for_ready, compression = self._args
        self._start = time.perf_counter()
        call = stats.handle.call(self._method)(
            self._request, timeout=timeout, metadata=metadata or base_metadata, credentials=credentials,
            wait_for_ready=wait_for_ready, compression=compression,
        )  # fmt: skip
        if self._scope is not None:
            self._scope.track(call)
        return call

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    async def _result(self) -> Any:
        method, channel, scope = self._method, self._channel, self._scope
        timeout = self._args[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._call is None:
            delay = method._hedge_delay(scope)
            if delay is not None:
                return await _Hedged(self, deadline).run(delay)
        tries: Attempts | None = None
        failed = None
        while True:
            if self._call is None:
                stats, self._done = await channel._pick_waiting(self._args[3], deadline, failed)
                metadata = None if tries is None else with_attempt(self._args[1], tries.number)
                self._call = self._send(stats, metadata)
            try:
                response = await self._call
            except grpc.RpcError as exc:
                self._untrack()
                if self._done(outcome_of(exc.code()), time.perf_counter() - self._start):
                    channel.balancer.refresh()
                tries = tries or Attempts(method, deadline, scope)
                delay = tries.delay(exc)
                if delay is None:
                    raise channel._error(exc) from None
                if delay:
                    await asyncio.sleep(delay)
                self._args = (tries.timeout(), *self._args[1:])
                self._call = None
                failed = self._stats
                continue
            except BaseException:
                # Cancelled while waiting for the response.
                self._untrack()
                self._done(Outcome.IGNORED, time.perf_counter() - self._start)
                raise
            self._untrack()
            latency = time.perf_counter() - self._start
            self._done(Outcome.SUCCESS, latency)
            if method._hedge_state is not None:
                method._hedge_state.latencies.add(latency)
            return response

    def _untrack(self) -> None:
        if self._scope is not None:
            self._scope.untrack(self._call)

    def cancel(self) -> bool:
        """Cancel the call; the server sees CANCELLED."""
        return self._call is not None and bool(self._call.cancel())


class _Attempt:
    """One copy of a hedged call."""

    __slots__ = ("call", "done", "index", "start", "stats")

    def __init__(self, call: Any, stats: Any, done: Any, index: int) -> None:
        self.call, self.stats, self.done, self.index = call, stats, done, index
        self.start = time.perf_counter()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Hedged:
    """One hedged unary call: a backup after a delay, first answer wins, losers cancelled.

    Driven by the calls' done-callbacks and one timer, not by a task per
    copy: hedged methods stay close to the cost of plain calls.
    """

    def __init__(self, call: UnaryCall, deadline: float | None) -> None:
        self._call = call
        self._method = call._method
        self._channel = call._channel
        self._deadline = deadline
        self._running: list[_Attempt] = []
        self._ready: list[_Attempt] = []
        self._wakeup: asyncio.Future[None] | None = None
        self._sent = 0

    async def _send(self) -> None:
        call = self._call
        self._sent += 1
        avoid = self._running[-1].stats if self._running else None
        stats, done = await self._channel._pick_waiting(call._args[3], self._deadline, avoid)
        try:
            call._args = (remaining_timeout(self._deadline), *call._args[1:])
        except DeadlineExceeded:
            done(Outcome.IGNORED, 0.0)
            raise
        metadata = None if self._sent == 1 else with_attempt(call._args[1], self._sent)
        attempt = _Attempt(call._send(stats, metadata), stats, done, self._sent)
        self._running.append(attempt)
        attempt.call.add_done_callback(lambda _: self._finished(attempt))

    def _finished(self, attempt: _Attempt) -> None:
        self._ready.append(attempt)
        if self._wakeup is not None:
            _wake(self._wakeup)

    async def _next(self, wait: float | None) -> None:
        """Wait until a copy ends or ``wait`` seconds pass."""
        loop = asyncio.get_running_loop()
        self._wakeup = wakeup = loop.create_future()
        timer = None if wait is None else loop.call_later(wait, _wake, wakeup)
        try:
            await wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    async def run(self, delay: float) -> Any:
        method = self._method
        assert method._hedge_state is not None
        max_attempts = method._hedge_state.policy.max_attempts
        wait: float | None = delay
        error: BaseException | None = None
        await self._send()
        try:
            while self._running:
                if not self._ready:
                    await self._next(wait if self._sent < max_attempts else None)
                if not self._ready:  # the hedging delay passed first
                    if method._may_hedge():
                        await self._send()
                    else:
                        wait = None  # budget spent: wait for what is running
                    continue
                ready, self._ready = self._ready, []
                for attempt in ready:
                    self._running.remove(attempt)
                    response, error = await self._settle(attempt)
                    if error is None:
                        return response
                if method._ends_hedge(error):
                    break
                if not self._running and self._sent < max_attempts:
                    await self._send()  # every copy failed retryably: the next goes now
        finally:
            self._cancel_rest()
        assert error is not None
        raise self._channel._error(error) if isinstance(error, grpc.RpcError) else error

    async def _settle(self, attempt: _Attempt) -> tuple[Any, BaseException | None]:
        """Report an ended copy to its pick: (response, None) or (None, its error)."""
        elapsed = time.perf_counter() - attempt.start
        scope = self._call._scope
        if scope is not None:
            scope.untrack(attempt.call)
        if attempt.call.cancelled():
            attempt.done(Outcome.IGNORED, elapsed)
            return None, Cancelled(f"{self._method.method}: cancelled")
        try:
            response = await attempt.call  # already done: returns or raises at once
        except grpc.RpcError as exc:
            if attempt.done(outcome_of(exc.code()), elapsed):
                self._channel.balancer.refresh()
            return None, exc
        attempt.done(Outcome.SUCCESS, elapsed)
        self._method._hedge_state.latencies.add(elapsed)  # type: ignore[union-attr]  # set for hedged methods
        if attempt.index > 1:
            self._channel.stats.hedge_wins += 1
        return response, None

    def _cancel_rest(self) -> None:
        scope = self._call._scope
        for attempt in self._running:
            attempt.call.cancel()
            attempt.done(Outcome.IGNORED, time.perf_counter() - attempt.start)
            if scope is not None:
                scope.untrack(attempt.call)
        self._running.clear()


def _open_stream(
    method: MethodBase, request: Any, args: tuple[Any, ...], scope: CallScope | None, avoid: Any = None
) -> tuple[Any, Any]:
    """Pick once for a stream; the pick is released when the stream ends. Returns (call, endpoint)."""
    channel: Channel = method._channel  # type: ignore[assignment]
    timeout, metadata, credentials, wait_for_ready, compression = args
    try:
        stats, done = channel._pick_now(wait_for_ready, avoid)
    except NoEndpointError:
        raise Unavailable(channel.balancer.reason) from None
    call = stats.handle.call(method)(
        request, timeout=timeout, metadata=metadata, credentials=credentials,
        wait_for_ready=wait_for_ready, compression=compression,
    )  # fmt: skip
    # Streams count as in-flight while open; their length says nothing about
    # the endpoint's latency, so they neither age nor feed the EWMA.
    stats.as_stream()
    if scope is None:
        call.add_done_callback(lambda _: done(Outcome.IGNORED, -1.0))
    else:
        scope.track(call)

        def ended(_: Any) -> None:
            done(Outcome.IGNORED, -1.0)
            scope.untrack(call)

        call.add_done_callback(ended)
    return call, stats


def _start_stream(method: MethodBase, request: Any, args: tuple[Any, ...], scope: CallScope | None) -> Call:
    return Call(_open_stream(method, request, args, scope)[0])


class _RetryingStream(Call):
    """A server stream that is restarted elsewhere if it fails before its first response."""

    __slots__ = ("_args", "_method", "_request", "_scope", "_stats", "_tries")

    def __init__(self, method: MethodBase, request: Any, args: tuple[Any, ...], scope: CallScope | None) -> None:
        call, self._stats = _open_stream(method, request, args, scope)
        super().__init__(call)
        self._method, self._request, self._args, self._scope = method, request, args, scope
        self._tries = Attempts(method, None if args[0] is None else time.monotonic() + args[0], scope)

    async def _responses(self) -> AsyncIterator[Any]:
        replayable = True
        while True:
            try:
                async for response in self._call:
                    replayable = False
                    yield response
                return
            except grpc.RpcError as exc:
                if not replayable or not await self._restart(exc):
                    raise from_grpc(exc) from None

    async def _restart(self, exc: grpc.RpcError) -> bool:
        delay = self._tries.delay(exc)
        if delay is None:
            return False
        if delay:
            await asyncio.sleep(delay)
        args = (self._tries.timeout(), with_attempt(self._args[1], self._tries.number), *self._args[2:])
        self._call, self._stats = _open_stream(self._method, self._request, args, self._scope, self._stats)
        return True


class UnaryUnary(MethodBase, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """Unary method: ``await stub.Method(request, timeout=..., metadata=...)``."""

    __slots__ = ()
    kind = "unary_unary"

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        timeout, metadata, scope = self._prepare(timeout, metadata)
        return UnaryCall(self, request, (timeout, metadata, credentials, wait_for_ready, compression), scope)


class UnaryStream(MethodBase, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    """Server-streaming method: ``async for response in stub.Method(request)``."""

    __slots__ = ()
    kind = "unary_stream"

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        timeout, metadata, scope = self._prepare(timeout, metadata)
        return _RetryingStream(self, request, (timeout, metadata, credentials, wait_for_ready, compression), scope)


class StreamUnary(MethodBase, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    """Client-streaming method: an (async) iterator of requests, or ``write()``."""

    __slots__ = ()
    kind = "stream_unary"

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        timeout, metadata, scope = self._prepare(timeout, metadata)
        args = (timeout, metadata, credentials, wait_for_ready, compression)
        return _start_stream(self, request_iterator, args, scope)


class StreamStream(MethodBase, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    """Bidirectional-streaming method: requests in, ``async for`` responses out."""

    __slots__ = ()
    kind = "stream_stream"

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        timeout, metadata, scope = self._prepare(timeout, metadata)
        args = (timeout, metadata, credentials, wait_for_ready, compression)
        return _start_stream(self, request_iterator, args, scope)


class _Subchannel(SubchannelBase):
    """One endpoint: a grpc.aio channel, its connectivity task and health task."""

    def __init__(self, address: str, core: BalancerCore, config: ChannelConfig) -> None:
        options, tls = config.channel_options(), config.tls
        if tls is not None:
            creds = channel_credentials(tls)
            channel = grpc.aio.secure_channel(address, creds, options=options + tls.channel_options())
        else:
            channel = grpc.aio.insecure_channel(address, options=options)
        super().__init__(address, channel)
        self._core = core
        self._watch: Any = None  # the health Watch call in progress, ended first by close()
        self._tasks = [asyncio.ensure_future(self._watch_state())]
        if config.health_check:
            self._tasks.append(asyncio.ensure_future(self._watch_health(config.health_service)))

    def ready(self) -> bool:
        return self.channel.get_state(False) is grpc.ChannelConnectivity.READY

    def connectivity(self) -> Connectivity:
        return connectivity_of(self.channel.get_state(False))

    async def _watch_state(self) -> None:
        state = self.channel.get_state(try_to_connect=True)
        while True:
            self._core.set_connectivity(self.address, connectivity_of(state))
            await self.channel.wait_for_state_change(state)
            # try_to_connect: a dropped connection goes IDLE; reconnect at once.
            state = self.channel.get_state(try_to_connect=True)

    async def _watch_health(self, service: str) -> None:
        request = health_pb2.HealthCheckRequest(service=service)
        stub = health_pb2_grpc.HealthStub(self.channel)
        backoff = 0.05
        while True:
            try:
                self._watch = stub.Watch(request, wait_for_ready=True)
                async for response in self._watch:
                    serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                    self._core.set_serving(self.address, serving, name)
                    backoff = 0.05
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._core.set_serving(self.address, True)  # no health service: trust connectivity
                    return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def close(self, grace: float | None = None) -> None:
        """Stop watching and close the channel."""
        if self._watch is not None and not self._watch.done():
            # End the Watch through grpc and let its task see it end: cancelling a
            # task inside a grpc.aio read leaks the read's native buffers (about
            # 1.5 KB per channel, grpc/grpc#43360).
            self._watch.cancel()
            await asyncio.wait(self._tasks[1:], timeout=_WATCH_END)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.channel.close(grace)


class Channel(BalancedChannelBase, grpc.aio.Channel):  # type: ignore[misc]
    """An asyncio client channel to a service (see :class:`rpcframe.Channel`).

    Create it inside a running event loop (it starts connectivity and health
    watchers as tasks).
    """

    def __init__(self, target: Target, config: ChannelConfig | None = None) -> None:
        super().__init__(target, config)
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._core.add_listener(self._on_picker)
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        self._resolver.start(self._on_endpoints)

    def _on_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        # Resolvers may report from their own threads; apply on the loop.
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._apply(endpoints)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._apply, endpoints)

    def _apply(self, endpoints: Sequence[Endpoint]) -> None:
        if self._closed:
            return
        _, removed = self._core.set_endpoints(endpoints, attach=self._attach)
        for entry in removed:
            task = asyncio.ensure_future(self._retire(entry))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _attach(self, entry: EndpointEntry) -> None:
        entry.stats.handle = _Subchannel(entry.stats.address, self._core, self.config)

    async def _retire(self, entry: EndpointEntry) -> None:
        """Close a removed endpoint; grpc.aio lets its active calls finish within the grace."""
        await entry.stats.handle.close(self.config.close_grace)

    def _on_picker(self) -> None:
        # Wake every waiter, then re-arm for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _pick_waiting(
        self, wait_for_ready: bool | None, deadline: float | None, avoid: EndpointStats | None = None
    ) -> Pick:
        while True:
            try:
                return self._pick_now(wait_for_ready, avoid)
            except NoEndpointError:
                if not wait_for_ready:
                    raise Unavailable(self._core.reason) from None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"waiting for an endpoint: {self._core.reason}")
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                raise DeadlineExceeded(f"waiting for an endpoint: {self._core.reason}") from None

    def _error(self, exc: grpc.RpcError) -> RpcError:
        err = from_grpc(exc)
        if err.code() is grpc.StatusCode.UNAVAILABLE and self._core.fallback:
            return Unavailable(f"{self._core.reason}: {err.details()}")
        return err

    def stub(self, stub_class: Callable[[grpc.aio.Channel], S]) -> S:
        """Instantiate a generated ``*Stub`` class on this channel."""
        return stub_class(self)

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> UnaryUnary:
        """Wrap a unary method (called by generated stubs)."""
        return UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> UnaryStream:
        """Wrap a server-streaming method (called by generated stubs)."""
        return UnaryStream(self, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> StreamUnary:
        """Wrap a client-streaming method (called by generated stubs)."""
        return StreamUnary(self, method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> StreamStream:
        """Wrap a bidirectional-streaming method (called by generated stubs)."""
        return StreamStream(self, method, request_serializer, response_deserializer)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The target's aggregate connectivity (READY if any endpoint is)."""
        return grpc.ChannelConnectivity[self._core.aggregate().name]

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Wait until the aggregate state differs from ``last_observed_state``."""
        while self.get_state() == last_observed_state:
            await self._changed.wait()

    async def channel_ready(self) -> None:
        """Wait until some endpoint is ready."""
        while self._core.fallback or not self._core.picker.endpoints:
            await self._changed.wait()

    async def close(self, grace: float | None = None) -> None:
        """Close every endpoint's channel; calls still active after ``grace`` are cancelled."""
        self._closed = True
        self._resolver.close()
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*(e.stats.handle.close(grace) for e in self._core.entries()))

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def connect(target: Target, config: ChannelConfig | None = None) -> Channel:
    """Open an asyncio channel to ``target`` (call it inside a running event loop)."""
    return Channel(target, config)
