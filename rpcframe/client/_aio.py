"""The asyncio client front: a ``grpc.aio.Channel`` whose calls go through rpcframe."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from ..config import ChannelConfig
from ..errors import from_grpc
from ._common import Metadata, MethodBase

__all__ = ["Channel", "connect"]

S = TypeVar("S")


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


class UnaryUnary(MethodBase, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """Unary method: ``await stub.Method(request, timeout=..., metadata=...)``."""

    __slots__ = ()

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
        timeout, metadata = self._prepare(timeout, metadata)
        return Call(self._call(request, timeout=timeout, metadata=metadata, credentials=credentials,
                               wait_for_ready=wait_for_ready, compression=compression))  # fmt: skip


class UnaryStream(MethodBase, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    """Server-streaming method: ``async for response in stub.Method(request)``."""

    __slots__ = ()

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
        timeout, metadata = self._prepare(timeout, metadata)
        return Call(self._call(request, timeout=timeout, metadata=metadata, credentials=credentials,
                               wait_for_ready=wait_for_ready, compression=compression))  # fmt: skip


class StreamUnary(MethodBase, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    """Client-streaming method: an (async) iterator of requests, or ``write()``."""

    __slots__ = ()

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        timeout, metadata = self._prepare(timeout, metadata)
        return Call(self._call(request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                               wait_for_ready=wait_for_ready, compression=compression))  # fmt: skip


class StreamStream(MethodBase, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    """Bidirectional-streaming method: requests in, ``async for`` responses out."""

    __slots__ = ()

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        timeout, metadata = self._prepare(timeout, metadata)
        return Call(self._call(request_iterator, timeout=timeout, metadata=metadata, credentials=credentials,
                               wait_for_ready=wait_for_ready, compression=compression))  # fmt: skip


class Channel(grpc.aio.Channel):  # type: ignore[misc]
    """An asyncio client channel; pass it to a generated stub or use :meth:`stub`."""

    def __init__(self, target: str, config: ChannelConfig | None = None) -> None:
        self.target = target
        self.config = config or ChannelConfig()
        self._channel = grpc.aio.insecure_channel(target, options=self.config.channel_options())

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
        return UnaryUnary(
            method,
            self._channel.unary_unary(method, request_serializer, response_deserializer, _registered_method),
            self.config,
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> UnaryStream:
        """Wrap a server-streaming method (called by generated stubs)."""
        return UnaryStream(
            method,
            self._channel.unary_stream(method, request_serializer, response_deserializer, _registered_method),
            self.config,
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> StreamUnary:
        """Wrap a client-streaming method (called by generated stubs)."""
        return StreamUnary(
            method,
            self._channel.stream_unary(method, request_serializer, response_deserializer, _registered_method),
            self.config,
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> StreamStream:
        """Wrap a bidirectional-streaming method (called by generated stubs)."""
        return StreamStream(
            method,
            self._channel.stream_stream(method, request_serializer, response_deserializer, _registered_method),
            self.config,
        )

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """Current connectivity state."""
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Wait until the state differs from ``last_observed_state``."""
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        """Wait until the channel is connected."""
        await self._channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still active after ``grace`` are cancelled."""
        await self._channel.close(grace)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def connect(target: str, config: ChannelConfig | None = None) -> Channel:
    """Open an asyncio channel to ``target`` (``host:port`` or a grpc target URI)."""
    return Channel(target, config)
