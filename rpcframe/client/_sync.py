"""The sync client front: a ``grpc.Channel`` whose calls go through rpcframe."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
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


class ResponseStream(grpc.Call):  # type: ignore[misc]
    """A streaming call's responses; iteration raises rpcframe errors.

    A server stream that fails before its first response is restarted on
    another endpoint when the retry policy allows (``restart``).
    """

    __slots__ = ("_call", "_restart")

    def __init__(self, call: Any, restart: Callable[[grpc.RpcError, Any], Any | None] | None = None) -> None:
        self._call = call
        self._restart = restart

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                response = next(self._call)
            except grpc.RpcError as exc:
                call = None if self._restart is None else self._restart(exc, self._call)
                if call is None:
                    raise from_grpc(exc) from None
                self._call = call
                continue
            self._restart = None  # a response arrived: the stream is no longer replayable
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


class _Future(grpc.Future):  # type: ignore[misc]
    """A unary call's future whose result() raises rpcframe errors."""

    __slots__ = ("_channel", "_future")

    def __init__(self, future: Any, channel: Channel) -> None:
        self._future = future
        self._channel = channel

    @property
    def call(self) -> grpc.Call:
        """The underlying call (metadata, status)."""
        return self._future

    def cancel(self) -> bool:
        return bool(self._future.cancel())

    def cancelled(self) -> bool:
        return bool(self._future.cancelled())

    def running(self) -> bool:
        return bool(self._future.running())

    def done(self) -> bool:
        return bool(self._future.done())

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._future.result(timeout)
        except grpc.RpcError as exc:
            raise self._channel._error(exc) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = self._future.exception(timeout)
        return self._channel._error(exc) if isinstance(exc, grpc.RpcError) else exc

    def traceback(self, timeout: float | None = None) -> Any:
        return self._future.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._future.add_done_callback(lambda _: fn(self))


# grpc_connectivity_state values as the cygrpc channel reports them.
_CY_STATES = {state.value[0]: state for state in grpc.ChannelConnectivity}
_CY_READY = grpc.ChannelConnectivity.READY.value[0]

_POLL_EXIT = 10.0  # seconds to wait for grpc's connectivity thread (it polls every 0.2 s; slow under load)


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
        options, tls = config.channel_options(), config.tls
        if tls is not None:
            creds = channel_credentials(tls)
            channel = grpc.secure_channel(address, creds, options=options + tls.channel_options())
        else:
            channel = grpc.insecure_channel(address, options=options)
        super().__init__(address, channel)
        # grpc's sync channel has no public "state now" call (only subscribe);
        # its own connectivity poller asks the cygrpc channel the same way.
        self._cy_channel = channel._channel
        self._core = core
        self._closed = threading.Event()
        self._kick: grpc.Future | None = None
        self._watch: Any = None
        self.channel.subscribe(self._on_state, try_to_connect=True)
        if config.health_check:
            threading.Thread(
                target=self._watch_health, args=(config.health_service,), daemon=True, name=f"rpcframe-health-{address}"
            ).start()

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

    def _watch_health(self, service: str) -> None:
        request = health_pb2.HealthCheckRequest(service=service)
        stub = health_pb2_grpc.HealthStub(self.channel)
        backoff = 0.05
        while not self._closed.is_set():
            try:
                self._watch = stub.Watch(request, wait_for_ready=True)
                for response in self._watch:
                    serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                    self._core.set_serving(self.address, serving, name)
                    backoff = 0.05
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._core.set_serving(self.address, True)  # no health service: trust connectivity
                    return
            except ValueError:
                return  # the channel was closed under us
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 2.0)

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


class UnaryUnary(MethodBase, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """Unary method: ``stub.Method(request, timeout=..., metadata=...)``."""

    __slots__ = ()
    kind = "unary_unary"

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        timeout, metadata, scope = self._prepare(timeout, metadata)
        return self._invoke(False, request, timeout, metadata, scope, (credentials, wait_for_ready, compression))

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        """Like calling the method, but also return the call (for metadata)."""
        timeout, metadata, scope = self._prepare(timeout, metadata)
        return self._invoke(True, request, timeout, metadata, scope, (credentials, wait_for_ready, compression))  # type: ignore[no-any-return]

    def _invoke(
        self,
        with_call: bool,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        scope: CallScope | None,
        rest: tuple[grpc.CallCredentials | None, bool | None, grpc.Compression | None],
    ) -> Any:
        channel: Channel = self._channel  # type: ignore[assignment]
        deadline = None if timeout is None else time.monotonic() + timeout
        hedge_delay = self._hedge_delay(scope)
        if hedge_delay is not None:
            return _Hedged(self, request, metadata, scope, rest, deadline).run(hedge_delay, with_call)
        credentials, wait_for_ready, compression = rest
        tries, failed, sent_metadata = None, None, metadata
        while True:
            stats, done = channel._pick(wait_for_ready, deadline, failed)
            mc = stats.handle.call(self)
            start = time.perf_counter()
            try:
                if scope is not None:
                    result = _cancellable(mc, scope, with_call, request, timeout, sent_metadata, rest)
                elif with_call:
                    result = mc.with_call(request, timeout, sent_metadata, credentials, wait_for_ready, compression)
                else:
                    result = mc(request, timeout, sent_metadata, credentials, wait_for_ready, compression)
            except grpc.RpcError as exc:
                if done(outcome_of(exc.code()), time.perf_counter() - start):
                    channel.balancer.refresh()
                tries = tries or Attempts(self, deadline, scope)
                delay = tries.delay(exc)
                if delay is None:
                    raise channel._error(exc) from None
                if delay:
                    time.sleep(delay)
                timeout = tries.timeout()
                sent_metadata = with_attempt(metadata, tries.number)
                failed = stats
                continue
            except grpc.FutureCancelledError:
                done(Outcome.IGNORED, time.perf_counter() - start)
                raise Cancelled(f"{self.method}: cancelled with the incoming call") from None
            latency = time.perf_counter() - start
            done(Outcome.SUCCESS, latency)
            if self._hedge_state is not None:
                self._hedge_state.latencies.add(latency)
            return result

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.Future:
        """Start the call and return a future of its response (no retries)."""
        timeout, metadata, scope = self._prepare(timeout, metadata)
        channel: Channel = self._channel  # type: ignore[assignment]
        stats, done = channel._pick(wait_for_ready, None if timeout is None else time.monotonic() + timeout)
        start = time.perf_counter()
        future = stats.handle.call(self).future(request, timeout, metadata, credentials, wait_for_ready, compression)
        _watch_future(future, done, start, scope)
        return _Future(future, channel)


def _cancellable(
    mc: Any, scope: CallScope, with_call: bool, request: Any, timeout: float | None, metadata: Metadata | None,
    rest: tuple[Any, Any, Any],
) -> Any:  # fmt: skip
    """A blocking call made while handling a call: cancelled if that call ends early."""
    future = mc.future(request, timeout, metadata, *rest)
    scope.track(future)
    try:
        result = future.result()
    finally:
        scope.untrack(future)
    return (result, future) if with_call else result


def _watch_future(future: Any, done: Any, start: float, scope: CallScope | None) -> None:
    """Report a future's outcome to its pick and keep it cancellable from the incoming call."""
    if scope is not None:
        scope.track(future)

    def finished(f: Any) -> None:
        done(_future_outcome(f), time.perf_counter() - start)
        if scope is not None:
            scope.untrack(f)

    future.add_done_callback(finished)


class _Attempt:
    """One copy of a hedged call."""

    __slots__ = ("done", "future", "index", "start", "stats")

    def __init__(self, future: Any, stats: Any, done: Any, index: int) -> None:
        self.future, self.stats, self.done, self.index = future, stats, done, index
        self.start = time.perf_counter()


class _Hedged:
    """One hedged unary call: a backup after ``delay``, first answer wins, losers cancelled."""

    def __init__(
        self, method: UnaryUnary, request: Any, metadata: Metadata | None, scope: CallScope | None,
        rest: tuple[Any, Any, Any], deadline: float | None,
    ) -> None:  # fmt: skip
        self._method = method
        self._channel: Channel = method._channel  # type: ignore[assignment]
        self._request = request
        self._metadata = metadata
        self._scope = scope
        self._rest = rest
        self._deadline = deadline
        self._changed = threading.Event()
        self._running: list[_Attempt] = []
        self._sent = 0

    def _send(self) -> None:
        self._sent += 1
        avoid = self._running[-1].stats if self._running else None
        stats, done = self._channel._pick(self._rest[1], self._deadline, avoid)
        metadata = self._metadata if self._sent == 1 else with_attempt(self._metadata, self._sent)
        try:
            timeout = remaining_timeout(self._deadline)
        except DeadlineExceeded:
            done(Outcome.IGNORED, 0.0)
            raise
        future = stats.handle.call(self._method).future(self._request, timeout, metadata, *self._rest)
        if self._scope is not None:
            self._scope.track(future)
        future.add_done_callback(lambda _: self._changed.set())
        self._running.append(_Attempt(future, stats, done, self._sent))

    def run(self, delay: float, with_call: bool) -> Any:
        method = self._method
        assert method._hedge_state is not None
        max_attempts = method._hedge_state.policy.max_attempts
        self._send()
        error: BaseException | None = None
        wait: float | None = delay
        try:
            while self._running:
                if not self._changed.wait(wait if self._sent < max_attempts else None):
                    if method._may_hedge():
                        self._send()
                    else:
                        wait = None  # budget spent: wait for what is running
                    continue
                self._changed.clear()
                for attempt in [a for a in self._running if a.future.done()]:
                    self._running.remove(attempt)
                    error = self._settle(attempt)
                    if error is None:
                        result = attempt.future.result()
                        return (result, attempt.future) if with_call else result
                if method._ends_hedge(error):
                    break
                if not self._running and self._sent < max_attempts:
                    self._send()  # every copy failed retryably: the next goes now
        finally:
            self._cancel_rest()
        assert error is not None
        raise self._channel._error(error) if isinstance(error, grpc.RpcError) else error from None

    def _settle(self, attempt: _Attempt) -> BaseException | None:
        """Report an ended copy to its pick; its error, or None if it answered."""
        future, elapsed = attempt.future, time.perf_counter() - attempt.start
        if self._scope is not None:
            self._scope.untrack(future)
        if future.cancelled():
            attempt.done(Outcome.IGNORED, elapsed)
            return Cancelled(f"{self._method.method}: cancelled with the incoming call")
        exc = future.exception()
        if exc is None:
            attempt.done(Outcome.SUCCESS, elapsed)
            self._method._hedge_state.latencies.add(elapsed)  # type: ignore[union-attr]  # set for hedged methods
            if attempt.index > 1:
                self._channel.stats.hedge_wins += 1
            return None
        if attempt.done(outcome_of(exc.code()), elapsed):
            self._channel.balancer.refresh()
        return exc  # type: ignore[no-any-return]

    def _cancel_rest(self) -> None:
        for attempt in self._running:
            attempt.future.cancel()
            attempt.done(Outcome.IGNORED, time.perf_counter() - attempt.start)
            if self._scope is not None:
                self._scope.untrack(attempt.future)
        self._running.clear()


def _future_outcome(future: Any) -> Outcome:
    if future.cancelled():
        return Outcome.IGNORED
    exc = future.exception()
    return outcome_of(exc.code()) if isinstance(exc, grpc.RpcError) else Outcome.SUCCESS


def _start_stream(
    method: MethodBase, request: Any, args: tuple[Any, ...], scope: CallScope | None, avoid: Any = None
) -> Any:
    """Pick once for a stream; the pick is released when the stream ends."""
    channel: Channel = method._channel  # type: ignore[assignment]
    timeout, wait_for_ready = args[0], args[3]
    stats, done = channel._pick(wait_for_ready, None if timeout is None else time.monotonic() + timeout, avoid)
    call = stats.handle.call(method)(request, *args)
    call._rpcframe_stats = stats
    # Streams count as in-flight while open; their length says nothing about
    # the endpoint's latency, so they neither age nor feed the EWMA.
    stats.as_stream()
    if scope is None:
        if not call.add_callback(lambda: done(Outcome.IGNORED, -1.0)):
            done(Outcome.IGNORED, -1.0)
        return call
    scope.track(call)

    def ended() -> None:
        done(Outcome.IGNORED, -1.0)
        scope.untrack(call)

    if not call.add_callback(ended):
        ended()
    return call


class _StreamRetry:
    """Restarts a server stream that failed before its first response (when the policy allows)."""

    __slots__ = ("_args", "_method", "_request", "_scope", "_tries")

    def __init__(self, method: MethodBase, request: Any, args: tuple[Any, ...], scope: CallScope | None) -> None:
        self._method, self._request, self._args, self._scope = method, request, args, scope
        self._tries = Attempts(method, None if args[0] is None else time.monotonic() + args[0], scope)

    def __call__(self, exc: grpc.RpcError, failed: Any) -> Any | None:
        delay = self._tries.delay(exc)
        if delay is None:
            return None
        if delay:
            time.sleep(delay)
        args = (self._tries.timeout(), with_attempt(self._args[1], self._tries.number), *self._args[2:])
        return _start_stream(self._method, self._request, args, self._scope, getattr(failed, "_rpcframe_stats", None))


class UnaryStream(MethodBase, grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    """Server-streaming method: returns an iterator of responses."""

    __slots__ = ()
    kind = "unary_stream"

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> ResponseStream:
        timeout, metadata, scope = self._prepare(timeout, metadata)
        args = (timeout, metadata, credentials, wait_for_ready, compression)
        return ResponseStream(_start_stream(self, request, args, scope), _StreamRetry(self, request, args, scope))


class StreamUnary(MethodBase, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    """Client-streaming method: takes an iterator of requests (no failover: it cannot be replayed)."""

    __slots__ = ()
    kind = "stream_unary"

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self.with_call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)[0]

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        """Like calling the method, but also return the call (for metadata)."""
        future = self.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return future.result(), future.call

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.Future:
        """Start the call and return a future of its response."""
        timeout, metadata, scope = self._prepare(timeout, metadata)
        channel: Channel = self._channel  # type: ignore[assignment]
        stats, done = channel._pick(wait_for_ready, None if timeout is None else time.monotonic() + timeout)
        start = time.perf_counter()
        mc = stats.handle.call(self)
        future = mc.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        _watch_future(future, done, start, scope)
        return _Future(future, channel)


class StreamStream(MethodBase, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    """Bidirectional-streaming method: requests in, an iterator of responses out."""

    __slots__ = ()
    kind = "stream_stream"

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> ResponseStream:
        timeout, metadata, scope = self._prepare(timeout, metadata)
        args = (timeout, metadata, credentials, wait_for_ready, compression)
        return ResponseStream(_start_stream(self, request_iterator, args, scope))


class Channel(BalancedChannelBase, grpc.Channel):  # type: ignore[misc]
    """A client channel to a service: one grpc channel per endpoint, a pick per call.

    ``target`` is ``host:port``, a comma-separated list, ``dns:///host:port``,
    a list of addresses, or a :class:`~rpcframe.balancing.resolver.Resolver`.
    Pass the channel to a generated stub or use :meth:`stub`; every method of
    the stub is an rpcframe wrapper, so calls are balanced, fail over when
    safe, and raise :mod:`rpcframe.errors` exceptions.
    """

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

    def _error(self, exc: grpc.RpcError) -> RpcError:
        err = from_grpc(exc)
        if err.code() is grpc.StatusCode.UNAVAILABLE and self._core.fallback:
            return Unavailable(f"{self._core.reason}: {err.details()}")
        return err

    def stub(self, stub_class: Callable[[grpc.Channel], S]) -> S:
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
