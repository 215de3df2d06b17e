"""The issue's acceptance runs on a real nats-server: a consumer killed -9, a broker restarted mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import EventContext, Events, Topic
from tests.conftest import eventually
from tests.events.natsserver import NatsServer

ROOT = Path(__file__).resolve().parents[2]


class Member:
    """A consumer-group member process (tests/events/consumer_proc.py), stopped by PID."""

    def __init__(self, url: str, topic: str, db: Path, log: Path) -> None:
        args = [sys.executable, "-m", "tests.events.consumer_proc", url, topic, "g", str(db), str(log)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once it joined the group (exits early on failure)
        assert line == "ready\n", f"consumer did not start: {line!r}"

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def effects(db: Path) -> tuple[int, int]:
    """(rows, distinct message ids) the handlers committed."""
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS effects (msg_id TEXT, message TEXT)")
        rows, distinct = conn.execute("SELECT count(*), count(DISTINCT msg_id) FROM effects").fetchone()
    return int(rows), int(distinct)


async def publish_all(events: Events, topic: Topic[pb.EchoRequest], ids: range, width: int = 64) -> None:
    """Publish ids concurrently, ``width`` in flight (each waits for its ack)."""
    for start in range(ids.start, ids.stop, width):
        await asyncio.gather(
            *(
                events.publish(topic, pb.EchoRequest(message=str(i)), msg_id=f"m{i}")
                for i in range(start, min(start + width, ids.stop))
            )
        )


def check_log(logs: list[Path]) -> tuple[int, int]:
    """Deliveries after a confirmed ack must not exist; returns (ids delivered twice or more, deliveries)."""
    handled: dict[str, list[int]] = defaultdict(list)
    acked: dict[str, int] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            kind, msg_id, ns = line.split()
            if kind == "h":
                handled[msg_id].append(int(ns))
            else:
                acked[msg_id] = min(int(ns), acked.get(msg_id, int(ns)))
    late = [i for i, times in handled.items() if i in acked and max(times) > acked[i]]
    assert late == [], f"delivered again after a confirmed ack: {late[:5]}"
    return sum(1 for times in handled.values() if len(times) > 1), sum(len(t) for t in handled.values())


async def kill_one_midway(nats: NatsServer, tmp_path: Path, unique: str, count: int, within: float) -> None:
    topic = Topic(f"tests.{unique}.kill", pb.EchoRequest)
    db, logs = tmp_path / "effects.db", [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "a2.log"]
    events = await Events.connect(nats.url, publisher="tests")
    await events.ensure(topic.stream)
    members = [Member(nats.url, topic.name, db, logs[0]), Member(nats.url, topic.name, db, logs[1])]
    try:
        await publish_all(events, topic, range(count))
        await eventually(lambda: _at_least(db, count // 3), within=within)
        members[0].kill()  # mid-stream, with deliveries in its hands
        at_kill = effects(db)[1]
        members.append(Member(nats.url, topic.name, db, logs[2]))
        await eventually(lambda: _at_least(db, count), within=within)
    finally:
        for member in members:
            member.stop()
        await events.close()
    rows, distinct = effects(db)
    assert (rows, distinct) == (count, count)  # 0 lost, each handler effect exactly once
    twice, deliveries = check_log(logs)
    assert deliveries >= count
    assert at_kill < count  # it was killed mid-stream
    print(f"killed at {at_kill}: {count} events, {deliveries} deliveries, {twice} ids delivered again (unconfirmed)")


async def _at_least(db: Path, n: int) -> bool:
    return (await asyncio.to_thread(effects, db))[1] >= n


async def test_group_of_two_one_killed_midway_loses_nothing(nats: NatsServer, tmp_path: Path, unique: str) -> None:
    await kill_one_midway(nats, tmp_path, unique, 3000, within=30)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(
    not os.environ.get("RPCFRAME_EVENTS_100K"), reason="the 100k-event run takes ~90 s: set RPCFRAME_EVENTS_100K=1"
)
async def test_group_of_two_one_killed_midway_100k(nats: NatsServer, tmp_path: Path, unique: str) -> None:
    await kill_one_midway(nats, tmp_path, unique, 100_000, within=300)


async def test_broker_restarted_mid_stream_publishers_retry_nothing_lost_or_stored_twice(
    own_nats: NatsServer, unique: str
) -> None:
    topic = Topic(f"tests.{unique}.restart", pb.EchoRequest)
    events = await Events.connect(own_nats.url, publisher="tests")
    count = 2000
    try:
        publishing = asyncio.create_task(publish_all(events, topic, range(count), width=16))
        await eventually(lambda: _stored_at_least(events, topic, count // 4), within=10)
        await asyncio.to_thread(own_nats.restart)
        await asyncio.wait_for(publishing, 60)
        info = await events.broker.js.stream_info(topic.stream.name)  # type: ignore[attr-defined]
        assert info.state.messages == count  # nothing lost, nothing stored twice
        seen: list[str] = []

        async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
            seen.append(ctx.msg_id)

        async with events.consumer(topic, "g", handle, concurrency=64):
            await eventually(lambda: _true(len(seen) >= count), within=20)
        assert sorted(seen) == sorted(f"m{i}" for i in range(count))
    finally:
        await events.close()


async def _stored_at_least(events: Events, topic: Topic[pb.EchoRequest], n: int) -> bool:
    try:
        info = await events.broker.js.stream_info(topic.stream.name)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not created yet
        return False
    return int(info.state.messages) >= n


async def _true(value: bool) -> bool:
    return value
