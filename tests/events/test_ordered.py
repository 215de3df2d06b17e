"""Ordering per key: a partitioned topic's events of one key are handled in publish order by a group."""

from __future__ import annotations

import asyncio
import random

import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import EventContext, Events, Topic
from tests.conftest import eventually


async def test_events_of_a_key_are_handled_in_order_by_a_group_with_failures(events: Events, unique: str) -> None:
    topic = Topic(f"ordered.{unique}", pb.EchoRequest, partitions=3)
    keys = [f"account-{k}" for k in range(6)]
    per_key = 15
    handled: dict[str, list[int]] = {k: [] for k in keys}
    rng = random.Random(7)

    def member() -> object:
        async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
            key, _, seq = event.message.partition(":")
            await asyncio.sleep(rng.random() * 0.003)  # members interleave
            if int(seq) % 7 == 3 and ctx.attempt == 1:
                raise RuntimeError("transient")  # redelivered: must still come before the next of its key
            handled[key].append(int(seq))

        return handle

    for seq in range(per_key):  # interleaved across keys, in order within each
        for key in keys:
            await events.publish(topic, pb.EchoRequest(message=f"{key}:{seq}"), key=key)
    async with (
        events.consumer(topic, "g", member(), backoff=(0.01,)),  # type: ignore[arg-type]
        events.consumer(topic, "g", member(), backoff=(0.01,)),  # type: ignore[arg-type]
    ):
        await eventually(lambda: asyncio.sleep(0, all(len(v) == per_key for v in handled.values())), within=20)
    assert handled == {k: list(range(per_key)) for k in keys}


async def test_key_is_required_exactly_for_ordered_topics(events: Events, unique: str) -> None:
    with pytest.raises(rpcframe.ConfigError, match="ordered by key: publish with key="):
        await events.publish(Topic(f"ordered.{unique}.a", pb.EchoRequest, partitions=2), pb.EchoRequest())
    with pytest.raises(rpcframe.ConfigError, match="is not ordered"):
        await events.publish(Topic(f"ordered.{unique}.b", pb.EchoRequest), pb.EchoRequest(), key="k")
    with pytest.raises(rpcframe.ConfigError, match="partitions must be >= 0"):
        Topic("x", pb.EchoRequest, partitions=-1)
