"""Typed topics on a real nats-server -js: publish-ack, dedupe, competing consumers, nack, dead letters."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe._core.overload import criticality_var
from rpcframe.events import DEAD_REASON, PUBLISHER, EventContext, Events, StoredMessage, Topic
from tests.conftest import eventually


def topic(unique: str) -> Topic[pb.EchoRequest]:
    return Topic(f"tests.{unique}.echo", pb.EchoRequest)


async def dead_letter(events: Events, t: Topic[pb.EchoRequest]) -> StoredMessage | None:
    return await events.broker.last(t.dead_letters.name, t.dead_letter_subject)


async def test_publish_is_acked_and_stored_once_per_msg_id(events: Events, unique: str) -> None:
    t = topic(unique)
    first = await events.publish(t, pb.EchoRequest(message="a"), msg_id="order-1")
    again = await events.publish(t, pb.EchoRequest(message="a"), msg_id="order-1")
    other = await events.publish(t, pb.EchoRequest(message="b"))
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again.sequence == first.sequence
    assert other.sequence == first.sequence + 1
    got: list[tuple[str, EventContext]] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        got.append((event.message, ctx))

    async with events.consumer(t, "g", handle):
        await eventually(lambda: _true(len(got) == 2))
    assert [m for m, _ in got] == ["a", "b"]
    ctx = got[0][1]
    assert (ctx.msg_id, ctx.attempt, ctx.publisher, ctx.subject) == ("order-1", 1, "tests", t.name)
    assert ctx.headers[PUBLISHER] == "tests"


async def _true(value: bool) -> bool:
    return value


async def test_wrong_type_is_refused_before_sending(events: Events, unique: str) -> None:
    with pytest.raises(TypeError, match="carries rpcframe.echo.v1.EchoRequest, not EchoResponse"):
        await events.publish(topic(unique), pb.EchoResponse(message="x"))  # type: ignore[misc] - mypy refuses it too


async def test_always_failing_handler_is_dead_lettered_after_max_deliveries(events: Events, unique: str) -> None:
    t = topic(unique)
    attempts: list[int] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        attempts.append(ctx.attempt)
        raise ValueError("no such customer")

    await events.publish(t, pb.EchoRequest(message="poison"), msg_id="p-1")
    async with events.consumer(t, "g", handle, max_deliveries=3, backoff=(0.01,)) as consumer:
        await eventually(lambda: _true(consumer.stats.dead_lettered == 1))
    assert attempts == [1, 2, 3]
    dead = await dead_letter(events, t)
    assert dead is not None
    assert pb.EchoRequest.FromString(dead.data).message == "poison"
    assert dead.headers[DEAD_REASON] == "handler failed 3 times; last: ValueError('no such customer')"
    assert dead.headers["rpcframe-dead-deliveries"] == "3"
    assert dead.headers["rpcframe-dead-group"] == "g"


async def test_failure_is_nacked_with_backoff_then_redelivered(events: Events, unique: str) -> None:
    t = topic(unique)
    attempts: list[int] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("flaky")

    await events.publish(t, pb.EchoRequest(message="x"))
    async with events.consumer(t, "g", handle, backoff=(0.2,)) as consumer:
        await eventually(lambda: _true(consumer.stats.handled == 1))
    assert attempts == [1, 2]
    assert consumer.stats.failed == 1
    assert consumer.stats.dead_lettered == 0


async def test_unparseable_message_is_dead_lettered_and_the_consumer_goes_on(events: Events, unique: str) -> None:
    t = topic(unique)
    got: list[str] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        got.append(event.message)

    await events.publish_raw(t.stream, t.name, b"\xff\xff\xff", {}, "garbage-1")
    await events.publish_raw(t.stream, t.name, b"", {"rpcframe-type": "acme.Other"}, "foreign-1")
    await events.publish(t, pb.EchoRequest(message="fine"))
    async with events.consumer(t, "g", handle) as consumer:
        await eventually(lambda: _true(consumer.stats.handled == 1 and consumer.stats.dead_lettered == 2))
    assert got == ["fine"]
    assert consumer.stats.reasons[0].startswith("does not parse as rpcframe.echo.v1.EchoRequest: Error parsing")
    assert consumer.stats.reasons[1] == "type acme.Other is not the topic's rpcframe.echo.v1.EchoRequest"


async def test_group_members_share_the_events_each_handled_once(events: Events, unique: str) -> None:
    t = topic(unique)
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def member(name: str) -> object:
        async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
            seen[name].append(event.message)
            await asyncio.sleep(0.001)  # a little work, so both members get a share

        return handle

    for i in range(200):
        await events.publish(t, pb.EchoRequest(message=str(i)))
    async with (
        events.consumer(t, "g", member("a"), concurrency=4),  # type: ignore[arg-type]
        events.consumer(t, "g", member("b"), concurrency=4),  # type: ignore[arg-type]
    ):
        await eventually(lambda: _true(len(seen["a"]) + len(seen["b"]) >= 200))
    assert sorted(seen["a"] + seen["b"], key=int) == [str(i) for i in range(200)]
    assert seen["a"]
    assert seen["b"]


async def test_handler_concurrency_is_bounded(events: Events, unique: str) -> None:
    t = topic(unique)
    running, peak, done = 0, 0, 0
    gate = asyncio.Event()

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        done += 1

    for i in range(10):
        await events.publish(t, pb.EchoRequest(message=str(i)))
    async with events.consumer(t, "g", handle, concurrency=3):
        await eventually(lambda: _true(running == 3))
        gate.set()
        await eventually(lambda: _true(done == 10))
    assert peak == 3


async def test_long_handler_extends_its_ack_deadline(events: Events, unique: str) -> None:
    t = topic(unique)
    attempts: list[int] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        attempts.append(ctx.attempt)
        await asyncio.sleep(2.2)  # over twice ack_wait: in-progress keeps it from being redelivered

    await events.publish(t, pb.EchoRequest(message="slow"))
    async with events.consumer(t, "g", handle, ack_wait=1.0) as consumer:
        await eventually(lambda: _true(consumer.stats.handled == 1), within=5)
    assert attempts == [1]


async def test_deadline_and_criticality_reach_the_handler(events: Events, unique: str) -> None:
    t = topic(unique)
    seen: list[tuple[float | None, str | None]] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        seen.append((rpcframe.time_remaining(), criticality_var.get()))

    with rpcframe.deadline_after(5.0), rpcframe.criticality("SHEDDABLE"):
        await events.publish(t, pb.EchoRequest(message="x"))
    async with events.consumer(t, "g", handle):
        await eventually(lambda: _true(len(seen) == 1))
    left, crit = seen[0]
    assert left is not None
    assert 3.0 < left <= 5.0
    assert crit == "SHEDDABLE"


async def test_expired_event_is_dead_lettered_unrun(events: Events, unique: str) -> None:
    t = topic(unique)
    ran: list[str] = []

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        ran.append(event.message)

    # As a publisher whose clock says the deadline passed a second ago would send it.
    past = {"rpcframe-deadline": f"{time.time() - 1:.6f}", "rpcframe-type": t.type_name}
    await events.publish_raw(t.stream, t.name, pb.EchoRequest(message="stale").SerializeToString(), past)
    async with events.consumer(t, "g", handle) as consumer:
        await eventually(lambda: _true(consumer.stats.dead_lettered == 1))
    assert ran == []
    assert consumer.stats.reasons[0].startswith("deadline passed")


async def test_plain_handler_runs_in_a_worker_thread(events: Events, unique: str) -> None:
    t = topic(unique)
    threads: list[str] = []

    def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        threads.append(threading.current_thread().name)

    await events.publish(t, pb.EchoRequest(message="x"))
    async with events.consumer(t, "g", handle) as consumer:
        await eventually(lambda: _true(consumer.stats.handled == 1))
    assert threads
    assert threads[0] != threading.main_thread().name
