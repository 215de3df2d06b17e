"""The broker's own authentication: credentials go to nats-py; a refused client is one clear error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import BrokerUnavailable, Events, Topic
from tests.events.natsserver import NatsServer

TOKEN = "s3cret-events-token"


@pytest.fixture
def token_nats(nats_binary: str) -> Iterator[NatsServer]:
    server = NatsServer(nats_binary, ("--auth", TOKEN))
    server.start()
    yield server
    server.close()


async def test_token_authenticated_publish_and_refused_without(token_nats: NatsServer) -> None:
    with pytest.raises(BrokerUnavailable, match="cannot connect to NATS at"):
        await Events.connect(token_nats.url, within=1.0)
    with pytest.raises(BrokerUnavailable):
        await Events.connect(token_nats.url, within=1.0, nats_options={"token": "wrong"})
    events = await Events.connect(token_nats.url, nats_options={"token": TOKEN})
    try:
        ack = await events.publish(Topic("secure.echo", pb.EchoRequest), pb.EchoRequest(message="x"))
        assert ack.sequence == 1
    finally:
        await events.close()
