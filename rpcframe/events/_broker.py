"""The broker seam: what rpcframe's typed topics need from a persistent message broker.

JetStream (:mod:`rpcframe.events._jetstream`) is the one driver today; the
interface is small enough for a Redis Streams or Kafka driver to follow:
durable append with a publisher-chosen id that is stored once, pull-based
competing consumers with explicit per-message ack / delayed nack / in-progress
/ terminate, the last message on a subject, and a live listen on a subject.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Broker", "BrokerMessage", "BrokerUnavailable", "Listener", "Pull", "StreamSpec", "StoredMessage"]


class BrokerUnavailable(Exception):
    """The broker did not answer in time (disconnected, restarting): the operation may be retried."""


@dataclass(frozen=True)
class StreamSpec:
    """A durable, append-only log of messages on some subjects.

    Attributes:
        name: the stream's name (letters, digits, ``_`` and ``-``).
        subjects: subjects stored in it (NATS wildcards allowed).
        duplicate_window: seconds during which a message id is stored once.
        max_age: seconds a message is kept (``None``: until removed by limits).
        work_queue: a message is removed once a consumer acknowledged it.
    """

    name: str
    subjects: tuple[str, ...]
    duplicate_window: float = 120.0
    max_age: float | None = None
    work_queue: bool = False


@dataclass(frozen=True)
class StoredMessage:
    """A message read back from a stream (by subject), not a delivery."""

    subject: str
    data: bytes
    headers: Mapping[str, str]


class BrokerMessage(Protocol):
    """One delivery of a stored message to a consumer group."""

    @property
    def subject(self) -> str:
        """The subject it was published on."""

    @property
    def data(self) -> bytes:
        """The payload."""

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers it was published with."""

    @property
    def delivery_count(self) -> int:
        """1 on the first delivery, then one more per redelivery."""

    async def ack(self, confirm: bool = False) -> None:
        """Done: never deliver it to this group again (``confirm``: wait for the broker's word)."""

    async def nak(self, delay: float) -> None:
        """Failed: deliver it again after ``delay`` seconds."""

    async def in_progress(self) -> None:
        """Still working: restart its ack deadline."""

    async def term(self) -> None:
        """Never deliver it again, without it counting as handled (it was dead-lettered)."""


class Pull(Protocol):
    """A durable consumer of a group: every message goes to one member of the group."""

    async def fetch(self, batch: int, within: float) -> Sequence[BrokerMessage]:
        """Up to ``batch`` messages; empty when none came within ``within`` s."""

    async def close(self) -> None:
        """Stop pulling; the group and its position stay on the broker."""


class Listener(Protocol):
    """Live messages on one subject, from the moment of listening (not stored ones)."""

    def __aiter__(self) -> AsyncIterator[StoredMessage]:
        """Messages as they are published."""


class Broker(Protocol):
    """A connection to a persistent broker."""

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream, or leave an existing one as it is."""

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str], *, msg_id: str, within: float
    ) -> tuple[int, bool]:
        """Store a message once per ``msg_id``: (sequence, whether it was a duplicate).

        Raises :class:`BrokerUnavailable` when the broker did not confirm in time.
        """

    async def pull(
        self, stream: str, subject: str, group: str, *, max_deliver: int, ack_wait: float, max_ack_pending: int = -1
    ) -> Pull:
        """Join (creating if needed) the durable consumer ``group`` of ``subject``.

        ``max_ack_pending``: deliveries the whole group may hold unanswered (-1: no limit; 1: in order).
        """

    async def last(self, stream: str, subject: str) -> StoredMessage | None:
        """The last stored message on ``subject``, or ``None``."""

    def listen(self, subject: str) -> AbstractAsyncContextManager[Listener]:
        """Receive messages on ``subject`` as they are published while the block runs."""

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (it comes back on its own after a broker restart)."""

    async def close(self) -> None:
        """Flush and disconnect."""
