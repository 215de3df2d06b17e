"""``rpcframe publish`` / ``rpcframe consume`` against a real nats-server: JSON in, JSON out."""

from __future__ import annotations

import json
import sys

from rpcframe.events import Events, Topic
from tests.conftest import run_process
from tests.events.natsserver import NatsServer

TYPE = "rpcframe.echo.v1.EchoRequest"


async def rpcframe(*args: str) -> tuple[int, str, str]:
    return await run_process([sys.executable, "-m", "rpcframe", *args])


async def test_publish_then_consume_json(nats: NatsServer, unique: str) -> None:
    topic = f"cli.{unique}.echo"
    code, out, err = await rpcframe(
        "publish", nats.url, topic, "--type", TYPE, "-d", '{"message": "hi"}', "--msg-id", "c-1"
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "stream": f"EVENTS_cli_{unique}_echo",
        "sequence": 1,
        "duplicate": False,
        "msg_id": "c-1",
    }
    code, out, _ = await rpcframe(
        "publish", nats.url, topic, "--type", TYPE, "-d", '{"message": "hi"}', "--msg-id", "c-1"
    )
    assert json.loads(out)["duplicate"] is True  # stored once
    await rpcframe("publish", nats.url, topic, "--type", TYPE, "-d", '{"message": "two"}')
    code, out, err = await rpcframe("consume", nats.url, topic, "--type", TYPE, "--count", "2", "--idle", "5")
    assert (code, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == [{"message": "hi"}, {"message": "two"}]


async def test_consume_dead_letters_shows_the_reason(nats: NatsServer, events: Events, unique: str) -> None:
    from generated.rpcframe.echo.v1 import echo_pb2 as pb

    topic = Topic(f"cli.{unique}.dead", pb.EchoRequest)
    await events.publish_raw(topic.stream, topic.name, b"\xff", {}, "bad-1")

    async def never(event: pb.EchoRequest, ctx: object) -> None:
        raise AssertionError("does not parse, never handled")

    async with events.consumer(topic, "g", never) as consumer:
        from tests.conftest import eventually

        async def dead() -> bool:
            return consumer.stats.dead_lettered == 1

        await eventually(dead)
    code, out, _ = await rpcframe("consume", nats.url, topic.name, "--type", TYPE, "--dead-letters", "--headers",
                                  "--count", "1", "--idle", "5")  # fmt: skip
    assert code == 0
    line = json.loads(out)
    assert line["headers"]["rpcframe-dead-reason"].startswith("does not parse as rpcframe.echo.v1.EchoRequest")
    assert line["event"]["unparseable"]


async def test_bad_input_is_one_error_line(nats: NatsServer) -> None:
    code, _, err = await rpcframe("publish", nats.url, "cli.x", "--type", "no.such.Type", "-d", "{}")
    assert (code, err) == (
        1,
        "rpcframe: error: unknown --type no.such.Type: pass --proto-module with its generated *_pb2 module\n",
    )
    code, _, err = await rpcframe("publish", nats.url, "cli.x", "--type", TYPE, "-d", '{"nope": 1}')
    assert code == 2
    assert err.startswith("rpcframe: error: -d: not a valid rpcframe.echo.v1.EchoRequest")
    code, _, err = await rpcframe("publish", nats.url, "cli.ordered", "--type", TYPE, "--partitions", "2")
    assert (code, err) == (2, "rpcframe: error: topic cli.ordered is ordered by key: publish with key=\n")
    code, _, err = await rpcframe("publish", nats.url, "bad topic", "--type", TYPE)
    assert code == 2
    assert "topic name must be dotted words" in err
    code, _, err = await rpcframe("publish", "nats://127.0.0.1:1", "cli.x", "--type", TYPE)
    assert code == 1
    assert err.startswith("rpcframe: error: cannot connect to NATS at nats://127.0.0.1:1")
    assert err.count("\n") == 1
