"""Idempotent consumers: run a handler once per message id, however often the event is delivered."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from google.protobuf.message import Message

from ._consumer import EventContext

__all__ = ["MemoryProcessedIds", "ProcessedIds", "SqliteProcessedIds", "once"]

M = TypeVar("M", bound=Message)


class ProcessedIds(Protocol):
    """Remembers which message ids were handled."""

    def run_once(self, msg_id: str, fn: Callable[[], None]) -> bool:
        """Run ``fn`` unless ``msg_id`` was handled; ``False`` when it was (``fn`` not run).

        ``fn`` raising leaves the id unhandled (the event is nacked and retried).
        """


class MemoryProcessedIds:
    """In-process store: enough for one consumer process, lost when it exits."""

    def __init__(self) -> None:
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def run_once(self, msg_id: str, fn: Callable[[], None]) -> bool:
        """Run ``fn`` once per id (ids handled concurrently are serialized)."""
        with self._lock:
            if msg_id in self._done:
                return False
            fn()
            self._done.add(msg_id)
            return True


class SqliteProcessedIds:
    """A SQLite file shared by every consumer process on the host: exactly once even across kill -9.

    The id is recorded in the same transaction as the handler's own writes to
    :attr:`connection` (inside ``fn``): a crash rolls both back, so a redelivery
    runs the handler again and a handled id is never run twice. Effects outside
    that database still happen at least once.
    """

    def __init__(self, path: str | Path) -> None:
        self.connection = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        # WAL with NORMAL sync survives a killed process (only an OS crash can lose the last commits).
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.connection.execute("CREATE TABLE IF NOT EXISTS rpcframe_processed (msg_id TEXT PRIMARY KEY)")
        self._lock = threading.Lock()

    def run_once(self, msg_id: str, fn: Callable[[], None]) -> bool:
        """Claim the id and run ``fn`` in one IMMEDIATE transaction; commit both or neither."""
        with self._lock:
            conn = self.connection
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM rpcframe_processed WHERE msg_id = ?", (msg_id,)).fetchone():
                    conn.execute("ROLLBACK")
                    return False
                conn.execute("INSERT INTO rpcframe_processed (msg_id) VALUES (?)", (msg_id,))
                fn()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return True

    def close(self) -> None:
        """Close the database."""
        self.connection.close()


def once(store: ProcessedIds, handler: Callable[[M, EventContext], None]) -> Callable[[M, EventContext], None]:
    """Wrap a plain (thread) handler so it runs once per message id; duplicates are acked unrun."""

    def wrapped(event: M, ctx: EventContext) -> None:
        store.run_once(ctx.msg_id, lambda: handler(event, ctx))

    return wrapped
