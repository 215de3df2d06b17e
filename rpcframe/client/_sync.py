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
from ..balancing.endpoint import Endpoint, EndpointStats
from ..balancing.pickers import NoEndpointError, Pick
from ..config import ChannelConfig
from ..errors import DeadlineExceeded, Unavailable
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
from ._flow import Flow, hedged_flow, stream_flow, unary_flow
from ._sync_calls import Future, ResponseStream, direct, drive
from ._sync_unary import lean_sync_unary

__all__ = ["Channel", "ResponseStream", "connect"]

# grpc_connectivity_state values as the cygrpc channel reports them.
_CY_STATES = {state.value[0]: state for state in grpc.ChannelConnectivity}
_POLL_EXIT = 10.0  # seconds to wait for grpc's connectivity thread (it polls every 0.2 s; slow under load)
_RETIRE_QUIET = 0.1  # seconds without a call in flight before a replaced connection is closed


class UnaryUnary(MethodBase, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """Unary method: ``stub.Method(request, timeout=..., metadata=...)``."""

    __slots__ = ()
    kind = "unary_unary"

    def __call__(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> Any:  # fmt: skip
        plan = self._prepare(request, timeout, metadata, credentials, wait_for_ready, compression)
        if self._direct:
            return direct(self, plan, request)
        return drive(self, self._flow(plan), request)

    def with_call(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                  credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                  compression: grpc.Compression | None = None) -> tuple[Any, grpc.Call]:  # fmt: skip
        """Like calling the method, but also return the call (for metadata)."""
        plan = self._prepare(request, timeout, metadata, credentials, wait_for_ready, compression)
        if self._direct:
            return direct(self, plan, request, with_call=True)  # type: ignore[no-any-return]
        return drive(self, self._flow(plan), request, with_call=True)  # type: ignore[no-any-return]

    def future(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
               credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
               compression: grpc.Compression | None = None) -> grpc.Future:  # fmt: skip
        """Start the call and return a future of its response (retried and failed over like a call)."""
        plan = self._prepare(request, timeout, metadata, credentials, wait_for_ready, compression)
        return Future(self, unary_flow(self, plan), request)

    def _flow(self, plan: CallPlan) -> Flow:
        delay = None if self._hedge_state is None else self._hedge_delay(plan.scope)  # no call when unhedged
        return unary_flow(self, plan) if delay is None else hedged_flow(self, plan, delay)


class UnaryStream(MethodBase, grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    """Server-streaming method: returns an iterator of responses."""

    __slots__ = ()
    kind = "unary_stream"

    def __call__(self, request: Any, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> ResponseStream:  # fmt: skip
        plan = self._prepare(request, timeout, metadata, credentials, wait_for_ready, compression)
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
        plan = self._prepare(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return Future(self, stream_flow(self, plan, retry=False), request_iterator)


class StreamStream(MethodBase, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    """Bidirectional-streaming method: requests in, an iterator of responses out."""

    __slots__ = ()
    kind = "stream_stream"

    def __call__(self, request_iterator: Iterator[Any], timeout: float | None = None,
                 metadata: Metadata | None = None, credentials: grpc.CallCredentials | None = None,
                 wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> ResponseStream:  # fmt: skip
        plan = self._prepare(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return ResponseStream(self, stream_flow(self, plan, retry=False), request_iterator)


class _Subchannel(SubchannelBase):
    """One endpoint: a grpc channel, its connectivity, and its health watch."""

    lean = staticmethod(lean_sync_unary)

    def __init__(self, address: str, core: BalancerCore, config: ChannelConfig) -> None:
        super().__init__(address, grpc, core, config)
        self._closed = threading.Event()
        # Held while asking a channel to reconnect, and by close() to mark it
        # closed, so nothing touches the grpc channel once close() has begun.
        self._closing = threading.Lock()
        self._watch: Any = None
        self.channel.subscribe(self._on_state, try_to_connect=True)
        if config.health_check:
            threading.Thread(target=self._watch_health, daemon=True, name=f"rpcframe-health-{address}").start()

    def connectivity(self) -> Connectivity:
        state = self._cy_channel.check_connectivity_state(False)
        return connectivity_of(_CY_STATES.get(state, grpc.ChannelConnectivity.IDLE))

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if self._closed.is_set():
            return
        self._core.set_connectivity(self.address, connectivity_of(state), self)
        if state is grpc.ChannelConnectivity.IDLE:
            # A dropped connection leaves the channel IDLE; reconnect at once
            # so the endpoint returns as soon as its server does. Asked
            # directly: a ready-future per IDLE would subscribe again, and one
            # left pending keeps grpc's polling thread alive past close().
            with self._closing:
                if not self._closed.is_set():
                    self._cy_channel.check_connectivity_state(True)

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
        with self._closing:
            self._closed.set()
        if self._watch is not None:
            self._watch.cancel()
        self.channel.unsubscribe(self._on_state)
        # grpc's connectivity-polling thread wakes every 0.2 s and fails if the
        # channel was closed under it, so close once it has seen the
        # unsubscribe and stopped.
        threading.Thread(target=self._close_channel, daemon=True, name="rpcframe-close").start()

    def _close_channel(self) -> None:
        close_unwatched(self.channel)


def close_unwatched(channel: grpc.Channel, wait: float = _POLL_EXIT) -> None:
    """Close a grpc channel once its connectivity-polling thread has stopped (at most ``wait`` s).

    grpc polls a watched channel's state every 0.2 s from a thread that
    raises "Cannot monitor channel state: Channel closed!" if the channel is
    closed under it; it stops on its own once nothing is subscribed (a
    ready-future unsubscribes when it completes).
    """
    state = getattr(channel, "_connectivity_state", None)
    until = time.monotonic() + wait
    while time.monotonic() < until and (state is None or state.polling):
        time.sleep(0.05)
    channel.close()


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
        self._resolver.start(self._on_endpoints)

    def _on_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        if self._closed:
            return
        _, removed = self._core.set_endpoints(self._with_connections(endpoints), attach=self._attach)
        for entry in removed:
            threading.Thread(target=self._retire, args=(entry,), daemon=True).start()

    def _attach(self, entry: EndpointEntry) -> None:
        handle = entry.stats.handle = _Subchannel(entry.stats.address, self._core, self.config)
        if self.config.connections_per_endpoint > 1:
            handle.renew = self._renew_later

    def _renew_later(self, address: str, serving: bool) -> None:
        delay = self._renewal(address, serving)
        if delay is not None:
            timer = threading.Timer(delay, self._renew_now, (address,))
            timer.daemon = True
            timer.start()

    def _renew_now(self, address: str) -> None:
        old = self._renew(address)
        if old is not None:
            threading.Thread(target=self._retire, args=(old,), daemon=True).start()

    def _retire(self, entry: EndpointEntry) -> None:
        """Close a removed endpoint once it has had no call in flight for a moment.

        grpc's close() cancels the channel's active calls (CANCELLED, the
        caller cannot know whether it ran). A caller that took the picker
        just before the endpoint left it may still begin a call on it a
        thread switch or two later, so "no call in flight" must hold for
        ``_RETIRE_QUIET`` seconds, not for one look.
        """
        deadline = time.monotonic() + self.config.close_grace
        quiet_since: float | None = None
        while (now := time.monotonic()) < deadline:
            if entry.stats.inflight > 0:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= _RETIRE_QUIET:
                break
            time.sleep(0.02)
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
