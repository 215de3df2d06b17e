"""An app for ``rpcframe serve --subscribers``: an asyncio echo servicer and a consumer of ``serve.echo`` events.

The consumer connects to ``RPCFRAME_TEST_NATS`` and appends each event's
message to the file ``RPCFRAME_TEST_HANDLED``; an event "hold" waits (10 s at
most) until the file ``RPCFRAME_TEST_RELEASE`` exists (it creates that path
with the suffix ``.started`` first), so a test can stop the server while a
handler is in flight.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.events import EventContext, Events, Topic

TOPIC = Topic("serve.echo", pb.EchoRequest)
GROUP = "serve-group"


class Echo(echo_pb2_grpc.EchoServiceServicer):
    """The RPC side of the app."""

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        return pb.EchoResponse(message=request.message)


servicer = Echo()


async def subscribers() -> list[Any]:
    """The event side: one consumer in group ``serve-group``."""
    events = await Events.connect(os.environ["RPCFRAME_TEST_NATS"], publisher="serve-app")
    handled = Path(os.environ["RPCFRAME_TEST_HANDLED"])
    release = Path(os.environ["RPCFRAME_TEST_RELEASE"])

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        if event.message == "hold":
            release.with_suffix(".started").touch()  # noqa: ASYNC240 - tells the test the handler runs
            deadline = time.monotonic() + 10
            # Another process's signal: a file, polled (bounded).
            while not release.exists() and time.monotonic() < deadline:  # noqa: ASYNC110, ASYNC240
                await asyncio.sleep(0.01)
        with handled.open("a") as out:  # noqa: ASYNC230 - one short line per event
            out.write(event.message + "\n")

    return [events.consumer(TOPIC, GROUP, handle)]


def not_async() -> list[Any]:
    """A factory that is not a coroutine function: refused by ``--subscribers``."""
    return []
