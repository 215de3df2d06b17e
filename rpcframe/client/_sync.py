"""The sync client front: a ``grpc.Channel`` whose calls go through rpcframe."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ..config import ChannelConfig
from ..errors import from_grpc
from ._common import Metadata, MethodBase

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

    __slots__ = ("_future",)

    def __init__(self, future: Any) -> None:
        self._future = future

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
            raise from_grpc(exc) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        exc = self._future.exception(timeout)
        return from_grpc(exc) if isinstance(exc, grpc.RpcError) else exc

    def traceback(self, timeout: float | None = None) -> Any:
        return self._future.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._future.add_done_callback(lambda _: fn(self))


class UnaryUnary(MethodBase, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """Unary method: ``stub.Method(request, timeout=..., metadata=...)``."""

    __slots__ = ()

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
        try:
            return self._call(request, timeout, metadata, credentials, wait_for_ready, compression)
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

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
        try:
            return self._call.with_call(request, timeout, metadata, credentials, wait_for_ready, compression)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> grpc.Future:
        """Start the call and return a future of its response."""
        timeout, metadata = self._prepare(timeout, metadata)
        return _Future(self._call.future(request, timeout, metadata, credentials, wait_for_ready, compression))


class UnaryStream(MethodBase, grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    """Server-streaming method: returns an iterator of responses."""

    __slots__ = ()

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
        return ResponseStream(self._call(request, timeout, metadata, credentials, wait_for_ready, compression))


class StreamUnary(MethodBase, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    """Client-streaming method: takes an iterator of requests."""

    __slots__ = ()

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        timeout, metadata = self._prepare(timeout, metadata)
        try:
            return self._call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

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
        timeout, metadata = self._prepare(timeout, metadata)
        try:
            return self._call.with_call(  # type: ignore[no-any-return]
                request_iterator, timeout, metadata, credentials, wait_for_ready, compression
            )
        except grpc.RpcError as exc:
            raise from_grpc(exc) from None

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
        return _Future(self._call.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression))


class StreamStream(MethodBase, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    """Bidirectional-streaming method: requests in, an iterator of responses out."""

    __slots__ = ()

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
        return ResponseStream(self._call(request_iterator, timeout, metadata, credentials, wait_for_ready, compression))


class Channel(grpc.Channel):  # type: ignore[misc]
    """A client channel; pass it to a generated stub or use :meth:`stub`.

    Every method of every stub made from it is an rpcframe wrapper, so calls
    get the channel's policy and raise :mod:`rpcframe.errors` exceptions.
    """

    def __init__(self, target: str, config: ChannelConfig | None = None) -> None:
        self.target = target
        self.config = config or ChannelConfig()
        self._channel = grpc.insecure_channel(target, options=self.config.channel_options())

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

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        """Watch connectivity changes (as ``grpc.Channel.subscribe``)."""
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        """Stop watching connectivity changes."""
        self._channel.unsubscribe(callback)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until connected; raise :class:`rpcframe.Unavailable` on timeout."""
        from ..errors import Unavailable

        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"{self.target}: not connected within {timeout}s") from None

    def close(self) -> None:
        """Close the channel; active calls are cancelled."""
        self._channel.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(target: str, config: ChannelConfig | None = None) -> Channel:
    """Open a channel to ``target`` (``host:port`` or any grpc target URI)."""
    return Channel(target, config)
