"""The asyncio client front: a ``grpc.aio.Channel`` whose calls go through rpcframe.

Its calls are :class:`~rpcframe.client._aio_call.Call` objects, which drive
the one call flow (:mod:`._flow`) on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from ..balancing.balancer import BalancerCore, Connectivity, EndpointEntry
from ..balancing.endpoint import Endpoint, EndpointStats
from ..balancing.pickers import NoEndpointError, Pick
from ..config import ChannelConfig
from ..errors import DeadlineExceeded, Unavailable
from ._aio_call import Call
from ._aio_unary import lean_unary
from ._common import (
    HEALTH_BACKOFF,
    BalancedChannelBase,
    Metadata,
    MethodBase,
    S,
    SubchannelBase,
    Target,
    connectivity_of,
)
from ._flow import hedged_flow, stream_flow, unary_flow

__all__ = ["Call", "Channel", "connect"]

_WATCH_END = 1.0  # seconds close() waits for a cancelled health Watch's task to end by itself


class UnaryUnary(MethodBase, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """Unary method: ``await stub.Method(request, timeout=..., metadata=...)``."""

    __slots__ = ()
    kind = "unary_unary"

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> Call:  # fmt: skip
        plan = self._prepare(request, timeout, metadata, credentials, wait_for_ready, compression)
        if self._direct:
            return Call(self, None, request, plan)
        delay = None if self._hedge_state is None else self._hedge_delay(plan.scope)  # no call when unhedged
        return Call(self, unary_flow(self, plan) if delay is None else hedged_flow(self, plan, delay), request)


class UnaryStream(MethodBase, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    """Server-streaming method: ``async for response in stub.Method(request)``."""

    __slots__ = ()
    kind = "unary_stream"

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> Call:  # fmt: skip
        plan = self._prepare(request, timeout, metadata, credentials, wait_for_ready, compression)
        return Call(self, stream_flow(self, plan, retry=True), request)


class StreamUnary(MethodBase, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    """Client-streaming method: an (async) iterator of requests, or ``write()``."""

    __slots__ = ()
    kind = "stream_unary"

    def __call__(self, request_iterator: Any = None, timeout: float | None = None, metadata: Metadata | None = None,
                 credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
                 compression: grpc.Compression | None = None) -> Call:  # fmt: skip
        plan = self._prepare(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return Call(self, stream_flow(self, plan, retry=False), request_iterator)


class StreamStream(StreamUnary, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    """Bidirectional-streaming method: requests in, ``async for`` responses out."""

    __slots__ = ()
    kind = "stream_stream"


class _Subchannel(SubchannelBase):
    """One endpoint: a grpc.aio channel, its connectivity task and health task."""

    lean = staticmethod(lean_unary)

    def __init__(self, address: str, core: BalancerCore, config: ChannelConfig) -> None:
        super().__init__(address, grpc.aio, core, config)
        self._watch: Any = None  # the health Watch call in progress, ended first by close()
        self._tasks = [asyncio.ensure_future(self._watch_state())]
        if config.health_check:
            self._tasks.append(asyncio.ensure_future(self._watch_health()))

    def connectivity(self) -> Connectivity:
        return connectivity_of(self.channel.get_state(False))

    async def _watch_state(self) -> None:
        state = self.channel.get_state(try_to_connect=True)
        while True:
            self._core.set_connectivity(self.address, connectivity_of(state), self)
            await self.channel.wait_for_state_change(state)
            # try_to_connect: a dropped connection goes IDLE; reconnect at once.
            state = self.channel.get_state(try_to_connect=True)

    async def _watch_health(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        backoff = HEALTH_BACKOFF[0]
        while True:
            try:
                self._watch = stub.Watch(self._health_request, wait_for_ready=True)
                async for response in self._watch:
                    self._health_seen(response)
                    backoff = HEALTH_BACKOFF[0]
            except grpc.RpcError as exc:
                if self._health_gone(exc):
                    return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, HEALTH_BACKOFF[1])

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

    _kinds = (UnaryUnary, UnaryStream, StreamUnary, StreamStream)

    def __init__(self, target: Target, config: ChannelConfig | None = None) -> None:
        super().__init__(target, config)
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._core.add_listener(self._on_picker)
        self._retiring: set[asyncio.Task[None]] = set()
        self._resolver.start(self._on_endpoints)

    def stub(self, stub_class: Callable[[grpc.aio.Channel], S]) -> S:
        """Instantiate a generated ``*Stub`` class on this channel, typed as its asyncio stub."""
        # Typed with grpc.aio.Channel (the base's takes Any) so that mypy, checking a user's code with
        # types-grpcio, picks the generated stub's asyncio overload: awaitable calls, async iterators.
        return stub_class(self)

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
        _, removed = self._core.set_endpoints(self._with_connections(endpoints), attach=self._attach)
        for entry in removed:
            task = asyncio.ensure_future(self._retire(entry))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _attach(self, entry: EndpointEntry) -> None:
        handle = entry.stats.handle = _Subchannel(entry.stats.address, self._core, self.config)
        if self.config.connections_per_endpoint > 1:
            handle.renew = self._renew_later

    def _renew_later(self, address: str, serving: bool) -> None:
        delay = self._renewal(address, serving)
        if delay is not None:
            self._loop.call_later(delay, self._renew_now, address)

    def _renew_now(self, address: str) -> None:
        old = self._renew(address)
        if old is not None:
            task = asyncio.ensure_future(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

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
