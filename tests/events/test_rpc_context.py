"""An RPC handler publishes an event: its trace context and deadline reach the event handler."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.events import EventContext, Events, Topic
from rpcframe.otel import TracingObserver
from tests.conftest import eventually


class Publishing(echo_pb2_grpc.EchoServiceServicer):
    """Echo that publishes what it is sent as an event (an order service would publish OrderCreated)."""

    def __init__(self, events: Events, topic: Topic[pb.EchoRequest]) -> None:
        self.events, self.topic = events, topic

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        await self.events.publish(self.topic, request)
        return pb.EchoResponse(message=request.message)


async def test_trace_context_and_deadline_of_an_rpc_reach_the_event_handler(events: Events, unique: str) -> None:
    topic = Topic(f"tests.{unique}.rpc", pb.EchoRequest)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1, observers=(TracingObserver(provider),)))
    server.add(Publishing(events, topic))
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    await server.start()
    seen: list[tuple[int, float | None, str]] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        trace_id = trace.get_current_span().get_span_context().trace_id
        seen.append((trace_id, rpcframe.time_remaining(), ctx.headers.get("traceparent", "")))

    try:
        async with rpcframe.aio.connect(address, rpcframe.ChannelConfig(default_timeout=4)) as channel:
            await channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="order"))
        async with events.consumer(topic, "g", handle):
            await eventually(lambda: _true(bool(seen)))
    finally:
        await server.stop(0)
        provider.shutdown()
    (server_span,) = spans.get_finished_spans()
    trace_id, left, traceparent = seen[0]
    assert trace_id == server_span.context.trace_id  # the handler runs in the RPC's trace
    assert traceparent.split("-")[1] == f"{server_span.context.trace_id:032x}"
    assert left is not None
    assert 1.0 < left < 4.0  # the RPC's 4 s deadline, less what has passed


async def _true(value: bool) -> bool:
    return value
