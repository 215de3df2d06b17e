"""Echo servicers for the echo contract, thread-pool and asyncio flavours.

Serve one with::

    rpcframe serve examples.echo:servicer --bind 127.0.0.1:50051      # sync
    rpcframe serve examples.echo:aio_servicer --bind 127.0.0.1:50051  # asyncio

Metadata whose key starts with ``echo-`` comes back as initial metadata, and
``x-`` keys as trailing metadata, so clients can see metadata travel both ways.
When ``$RPCFRAME_SERVER_ID`` is set, unary answers carry it as trailing
metadata ``x-server-id`` (the demo counts calls per backend with it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from generated.rpcframe.echo.v1 import echo_pb2, echo_pb2_grpc

_SERVER_ID = tuple(("x-server-id", v) for v in [os.environ.get("RPCFRAME_SERVER_ID", "")] if v)


def _echo_metadata_sync(context: grpc.ServicerContext, tag: tuple[tuple[str, str], ...] = _SERVER_ID) -> None:
    incoming = context.invocation_metadata() or ()
    initial = tuple((k, v) for k, v in incoming if k.startswith("echo-"))
    if initial:
        context.send_initial_metadata(initial)
    trailing = tuple((k, v) for k, v in incoming if k.startswith("x-")) + tag
    if trailing:
        context.set_trailing_metadata(trailing)


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Thread-pool echo servicer (``server_id`` overrides ``$RPCFRAME_SERVER_ID``)."""

    def __init__(self, server_id: str = "") -> None:
        self._tag = (("x-server-id", server_id),) if server_id else _SERVER_ID

    def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        _echo_metadata_sync(context, self._tag)
        return echo_pb2.EchoResponse(message=request.message)

    def Expand(self, request: echo_pb2.ExpandRequest, context: Any) -> Iterator[echo_pb2.EchoResponse]:
        _echo_metadata_sync(context)
        for i in range(request.count):
            yield echo_pb2.EchoResponse(message=request.message, index=i)

    def Collect(self, request_iterator: Iterator[echo_pb2.EchoRequest], context: Any) -> echo_pb2.CollectResponse:
        _echo_metadata_sync(context)
        messages = [r.message for r in request_iterator]
        return echo_pb2.CollectResponse(count=len(messages), message="".join(messages))

    def Chat(self, request_iterator: Iterator[echo_pb2.EchoRequest], context: Any) -> Iterator[echo_pb2.EchoResponse]:
        _echo_metadata_sync(context)
        for i, request in enumerate(request_iterator):
            yield echo_pb2.EchoResponse(message=request.message, index=i)


async def _echo_metadata_aio(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    incoming = context.invocation_metadata() or ()
    initial = tuple((k, v) for k, v in incoming if k.startswith("echo-"))
    if initial:
        await context.send_initial_metadata(initial)
    trailing = tuple((k, v) for k, v in incoming if k.startswith("x-")) + _SERVER_ID
    if trailing:
        context.set_trailing_metadata(trailing)


class AioEchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """asyncio echo servicer."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:  # type: ignore[override]
        await _echo_metadata_aio(context)
        return echo_pb2.EchoResponse(message=request.message)

    async def Expand(  # type: ignore[override]
        self, request: echo_pb2.ExpandRequest, context: Any
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        await _echo_metadata_aio(context)
        for i in range(request.count):
            yield echo_pb2.EchoResponse(message=request.message, index=i)

    async def Collect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: Any
    ) -> echo_pb2.CollectResponse:
        await _echo_metadata_aio(context)
        messages = [r.message async for r in request_iterator]
        return echo_pb2.CollectResponse(count=len(messages), message="".join(messages))

    async def Chat(  # type: ignore[override]
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: Any
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        await _echo_metadata_aio(context)
        i = 0
        async for request in request_iterator:
            yield echo_pb2.EchoResponse(message=request.message, index=i)
            i += 1


servicer = EchoServicer()
aio_servicer = AioEchoServicer()
