"""Servicers that answer with the caller's identity, and helpers to serve them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.security import peer

ECHO = "/rpcframe.echo.v1.EchoService/Echo"
EXPAND = "/rpcframe.echo.v1.EchoService/Expand"


def whoami(context: Any) -> str:
    who = peer(context)
    return f"{who.method}:{who.principal}"


class WhoAmI(echo_pb2_grpc.EchoServiceServicer):
    """Every answer carries ``method:principal`` of the caller."""

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:  # noqa: N802
        return pb.EchoResponse(message=whoami(context))

    def Expand(self, request: pb.ExpandRequest, context: Any) -> Iterator[pb.EchoResponse]:  # noqa: N802
        for i in range(request.count):
            yield pb.EchoResponse(message=whoami(context), index=i)

    def Collect(self, request_iterator: Iterator[pb.EchoRequest], context: Any) -> pb.CollectResponse:  # noqa: N802
        return pb.CollectResponse(count=sum(1 for _ in request_iterator), message=whoami(context))

    def Chat(self, request_iterator: Iterator[pb.EchoRequest], context: Any) -> Iterator[pb.EchoResponse]:  # noqa: N802
        for r in request_iterator:
            yield pb.EchoResponse(message=f"{r.message}:{whoami(context)}")


class AioWhoAmI(echo_pb2_grpc.EchoServiceServicer):
    """The asyncio flavour of :class:`WhoAmI`."""

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:  # noqa: N802
        return pb.EchoResponse(message=whoami(context))

    async def Expand(self, request: pb.ExpandRequest, context: Any) -> AsyncIterator[pb.EchoResponse]:  # noqa: N802
        for i in range(request.count):
            yield pb.EchoResponse(message=whoami(context), index=i)

    async def Collect(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.EchoRequest], context: Any
    ) -> pb.CollectResponse:
        count = 0
        async for _ in request_iterator:
            count += 1
        return pb.CollectResponse(count=count, message=whoami(context))

    async def Chat(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.EchoRequest], context: Any
    ) -> AsyncIterator[pb.EchoResponse]:
        async for r in request_iterator:
            yield pb.EchoResponse(message=f"{r.message}:{whoami(context)}")


def serve_sync(config: rpcframe.ServerConfig) -> tuple[rpcframe.Server, str]:
    """A started thread-pool server on 127.0.0.1:0; stop it with ``stop(0)``."""
    server = rpcframe.Server(config)
    server.add(WhoAmI())
    port = server.bind("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


async def serve_aio(config: rpcframe.ServerConfig) -> tuple[rpcframe.aio.Server, str]:
    """A started asyncio server on 127.0.0.1:0; stop it with ``await stop(0)``."""
    server = rpcframe.aio.Server(config)
    server.add(AioWhoAmI())
    port = server.bind("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
