"""SyncEvents: a thread-pool servicer publishes; its deadline and trace reach the event handler."""

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
from rpcframe.events import EventContext, Events, SyncEvents, Topic
from rpcframe.otel import TracingObserver
from tests.conftest import eventually
from tests.events.natsserver import NatsServer


class SyncPublishing(echo_pb2_grpc.EchoServiceServicer):
    def __init__(self, events: SyncEvents, topic: Topic[pb.EchoRequest]) -> None:
        self.events, self.topic = events, topic

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        ack = self.events.publish(self.topic, request, msg_id=request.message)
        return pb.EchoResponse(message=f"{ack.sequence}")


async def test_thread_pool_servicer_publishes_with_its_deadline_and_trace(
    nats: NatsServer, events: Events, unique: str
) -> None:
    topic = Topic(f"sync.{unique}", pb.EchoRequest)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    sync_events = SyncEvents.connect(nats.url, publisher="sync-orders")
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1, observers=(TracingObserver(provider),)))
    server.add(SyncPublishing(sync_events, topic))
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    seen: list[tuple[int, float | None, str]] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        seen.append((trace.get_current_span().get_span_context().trace_id, rpcframe.time_remaining(), ctx.publisher))

    try:
        async with rpcframe.aio.connect(address, rpcframe.ChannelConfig(default_timeout=4)) as channel:
            answer = await channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="s-1"))
        assert answer.message == "1"  # the stream's sequence, acknowledged before the RPC returned
        async with events.consumer(topic, "g", handle):
            await eventually(lambda: _true(bool(seen)))
    finally:
        server.stop(0)
        sync_events.close()
        provider.shutdown()
    (server_span,) = spans.get_finished_spans()
    trace_id, left, publisher = seen[0]
    assert trace_id == server_span.context.trace_id
    assert left is not None
    assert 1.0 < left < 4.0
    assert publisher == "sync-orders"


async def _true(value: bool) -> bool:
    return value
