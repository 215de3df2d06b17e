"""The sync client front: a ``grpc.Channel`` whose calls go through rpcframe."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..balancing.balancer import BalancerCore, EndpointEntry
from ..balancing.endpoint import Endpoint, EndpointStats, Outcome
from ..balancing.pickers import NoEndpointError, Pick
from ..config import ChannelConfig
from ..errors import DeadlineExceeded, RpcError, Unavailable, from_grpc
from ._common import (
    BalancedChannelBase,
    Metadata,
    MethodBase,
    SubchannelBase,
    Target,
    connectivity_of,
    outcome_of,
)

__all__ = ["Channel", "connect"]

S = TypeVar("S")


class ResponseStream(grpc.Call):  # type: ignore[misc]
    """A streaming call's responses; iteration raises rpcframe errors."""

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

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


_POLL_EXIT = 0.3  # > grpc's 0.2 s connectivity poll interval


class _Subchannel(SubchannelBase):
    """One endpoint: a grpc channel, its connectivity, and its health watch."""

    def __init__(self, address: str, core: BalancerCore, config: ChannelConfig) -> None:
        super().__init__(address, grpc.insecure_channel(address, options=config.channel_options()))
        self._core = core
        self._closed = threading.Event()
        self._kick: grpc.Future | None = None
        self._watch: Any = None
        self.channel.subscribe(self._on_state, try_to_connect=True)
        if config.health_check:
            threading.Thread(
                target=self._watch_health, args=(config.health_service,), daemon=True, name=f"rpcframe-health-{address}"
            ).start()

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if self._closed.is_set():
            return
        self._core.set_connectivity(self.address, connectivity_of(state))
        if state is grpc.ChannelConnectivity.IDLE:
            # A dropped connection leaves the channel IDLE; reconnect at once
            # so the endpoint returns as soon as its server does.
            self._kick = grpc.channel_ready_future(self.channel)

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
        if self._kick is not None:
            self._kick.cancel()
        if self._watch is not None:
            self._watch.cancel()
        self.channel.unsubscribe(self._on_state)
        # grpc's connectivity-polling thread wakes every 0.2 s and fails if the
        # channel was closed under it, so close once it has seen the
        # unsubscribe and stopped.
        threading.Thread(target=self._close_channel, daemon=True, name="rpcframe-close").start()

    def _close_channel(self) -> None:
        time.sleep(_POLL_EXIT)
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
        timeout, metadata = self._prepare(timeout, metadata)
        return self._invoke(False, request, timeout, metadata, credentials, wait_for_ready, compression)

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
        timeout, metadata = self._prepare(timeout, metadata)
        return self._invoke(True, request, timeout, metadata, credentials, wait_for_ready, compression)  # type: ignore[no-any-return]

    def _invoke(
        self,
        with_call: bool,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        channel: Channel = self._channel  # type: ignore[assignment]
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        failed = None
        while True:
            stats, done = channel._pick(wait_for_ready, deadline, failed)
            mc = stats.handle.call(self)
            start = time.perf_counter()
            try:
                if with_call:
                    result = mc.with_call(request, timeout, metadata, credentials, wait_for_ready, compression)
                else:
                    result = mc(request, timeout, metadata, credentials, wait_for_ready, compression)
            except grpc.RpcError as exc:
                if done(outcome_of(exc.code()), time.perf_counter() - start):
                    channel.balancer.refresh()
                retry, timeout = self._failover(exc, attempt, deadline)
                if not retry:
                    raise channel._error(exc) from None
                attempt += 1
                failed = stats
                continue
            done(Outcome.SUCCESS, time.perf_counter() - start)
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
        """Start the call and return a future of its response (no failover)."""
        timeout, metadata = self._prepare(timeout, metadata)
        channel: Channel = self._channel  # type: ignore[assignment]
        stats, done = channel._pick(wait_for_ready, None if timeout is None else time.monotonic() + timeout)
        start = time.perf_counter()
        future = stats.handle.call(self).future(request, timeout, metadata, credentials, wait_for_ready, compression)
        future.add_done_callback(lambda f: done(_future_outcome(f), time.perf_counter() - start))
        return _Future(future, channel)


def _future_outcome(future: Any) -> Outcome:
    if future.cancelled():
        return Outcome.IGNORED
    exc = future.exception()
    return outcome_of(exc.code()) if isinstance(exc, grpc.RpcError) else Outcome.SUCCESS


def _start_stream(method: MethodBase, request: Any, args: tuple[Any, ...], wait_for_ready: bool | None) -> Any:
    """Pick once for a stream; the pick is released when the stream ends."""
    channel: Channel = method._channel  # type: ignore[assignment]
    timeout = args[0]
    stats, done = channel._pick(wait_for_ready, None if timeout is None else time.monotonic() + timeout)
    call = stats.handle.call(method)(request, *args)
    # Streams count as in-flight while open; their length says nothing about
    # the endpoint's latency, so they neither age nor feed the EWMA.
    stats.as_stream()
    if not call.add_callback(lambda: done(Outcome.IGNORED, -1.0)):
        done(Outcome.IGNORED, -1.0)
    return call


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
        timeout, metadata = self._prepare(timeout, metadata)
        args = (timeout, metadata, credentials, wait_for_ready, compression)
        return ResponseStream(_start_stream(self, request, args, wait_for_ready))


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
        timeout, metadata = self._prepare(timeout, metadata)
        channel: Channel = self._channel  # type: ignore[assignment]
        stats, done = channel._pick(wait_for_ready, None if timeout is None else time.monotonic() + timeout)
        start = time.perf_counter()
        mc = stats.handle.call(self)
        future = mc.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        future.add_done_callback(lambda f: done(_future_outcome(f), time.perf_counter() - start))
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
        timeout, metadata = self._prepare(timeout, metadata)
        args = (timeout, metadata, credentials, wait_for_ready, compression)
        return ResponseStream(_start_stream(self, request_iterator, args, wait_for_ready))


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
        """Close every endpoint's channel; active calls are cancelled."""
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
