"""Subscribers hosted next to an asyncio rpcframe server: health per subscriber, stop finishes and acks."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2, health_pb2_grpc

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import EventContext, Events, Subscribers, Topic
from tests.conftest import eventually
from tests.events.natsserver import NatsServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_follows_the_broker_and_stop_finishes_in_flight_handlers(own_nats: NatsServer) -> None:
    topic = Topic("host.echo", pb.EchoRequest)
    events = await Events.connect(own_nats.url)
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1))
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    await server.start()
    gate, started, handled = asyncio.Event(), asyncio.Event(), []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        started.set()
        await gate.wait()
        handled.append(event.message)

    consumer = events.consumer(topic, "g", handle)
    subscribers = Subscribers(consumer, server=server, check_every=0.05)
    try:
        await subscribers.start()
        async with rpcframe.aio.connect(address) as channel:
            health = channel.stub(health_pb2_grpc.HealthStub)

            async def status_is(want: int) -> bool:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=consumer.name))
                return bool(answer.status == want)

            await eventually(lambda: status_is(SERVING))
            assert consumer.name == "events:host.echo/g"
            await asyncio.to_thread(own_nats.stop)
            await eventually(lambda: status_is(NOT_SERVING))
            await asyncio.to_thread(own_nats.start)
            await eventually(lambda: status_is(SERVING), within=10)

            await events.publish(topic, pb.EchoRequest(message="in flight"))
            await asyncio.wait_for(started.wait(), 10)
            stopping = asyncio.create_task(subscribers.stop())
            await eventually(lambda: status_is(NOT_SERVING))
            assert not stopping.done()  # waits for the handler in flight
            await events.publish(topic, pb.EchoRequest(message="after stop"))
            gate.set()
            await asyncio.wait_for(stopping, 10)
        assert handled == ["in flight"]  # nothing fetched once stopping
        info = await events.broker.js.consumer_info(topic.stream.name, "g")  # type: ignore[attr-defined]
        assert info.ack_floor.stream_seq == 1  # the one in flight was acked before stop returned
        # The later one is still the group's: not yet delivered, or delivered to the stopped member's
        # outstanding pull and back after ack_wait.
        assert info.num_pending + info.num_ack_pending == 1
    finally:
        gate.set()
        await subscribers.stop()
        await server.stop(0)
        await events.close()
