"""The processed-id stores: a handler runs once per message id; a failing one leaves the id unhandled."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import EventContext, MemoryProcessedIds, ProcessedIds, SqliteProcessedIds, once


def ctx(msg_id: str) -> EventContext:
    return EventContext(msg_id, "s", 1, "p", {})


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ProcessedIds:
    return MemoryProcessedIds() if request.param == "memory" else SqliteProcessedIds(tmp_path / "ids.db")


def test_runs_once_per_id_and_a_failure_leaves_it_unhandled(store: ProcessedIds) -> None:
    runs: list[str] = []
    fail = {"b"}

    def handle(event: pb.EchoRequest, c: EventContext) -> None:
        runs.append(c.msg_id)
        if c.msg_id in fail:
            raise RuntimeError("not now")

    handler = once(store, handle)
    handler(pb.EchoRequest(), ctx("a"))
    handler(pb.EchoRequest(), ctx("a"))  # a redelivery: acked unrun
    with pytest.raises(RuntimeError):
        handler(pb.EchoRequest(), ctx("b"))
    fail.clear()
    handler(pb.EchoRequest(), ctx("b"))  # the retry runs: the failed run did not count
    handler(pb.EchoRequest(), ctx("b"))
    assert runs == ["a", "b", "b"]


def test_sqlite_commits_the_handlers_writes_with_the_id_or_neither(tmp_path: Path) -> None:
    store = SqliteProcessedIds(tmp_path / "ids.db")
    store.connection.execute("CREATE TABLE effects (msg_id TEXT)")

    def write_then_fail(event: pb.EchoRequest, c: EventContext) -> None:
        store.connection.execute("INSERT INTO effects VALUES (?)", (c.msg_id,))
        if event.message == "fail":
            raise RuntimeError("after writing")

    handler = once(store, write_then_fail)
    with pytest.raises(RuntimeError):
        handler(pb.EchoRequest(message="fail"), ctx("x"))
    handler(pb.EchoRequest(message="ok"), ctx("x"))
    handler(pb.EchoRequest(message="ok"), ctx("x"))
    store.close()
    with sqlite3.connect(tmp_path / "ids.db") as conn:  # another process's view
        assert conn.execute("SELECT msg_id FROM effects").fetchall() == [("x",)]
        assert conn.execute("SELECT msg_id FROM rpcframe_processed").fetchall() == [("x",)]
