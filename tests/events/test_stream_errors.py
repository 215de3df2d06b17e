"""A stream the broker refuses to create is one clear rpcframe error, not nats-py's."""

from __future__ import annotations

import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import Events, Topic


async def test_a_topic_whose_subjects_another_stream_holds_is_a_config_error(events: Events, unique: str) -> None:
    js = events.broker.js  # type: ignore[attr-defined]
    await js.add_stream(name=f"OTHER_{unique}", subjects=[f"{unique}.>"])  # someone else's stream
    topic = Topic(f"{unique}.orders", pb.EchoRequest)
    with pytest.raises(rpcframe.ConfigError, match=f"refused stream .* for {unique}.orders: .*overlap"):
        await events.publish(topic, pb.EchoRequest(message="x"))
