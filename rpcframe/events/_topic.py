"""Typed topics: a subject, the protobuf message it carries, and where its dead letters go."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf.message import Message

from ..errors import ConfigError
from ._broker import StreamSpec

__all__ = ["Topic", "stream_name"]

M = TypeVar("M", bound=Message)
_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def stream_name(prefix: str, subject: str) -> str:
    """A JetStream stream name for ``subject`` (stream names cannot hold dots)."""
    return f"{prefix}_{subject.replace('.', '_')}"


@dataclass(frozen=True)
class Topic(Generic[M]):
    """A named stream of events of one protobuf type.

    Attributes:
        name: the subject, dotted (``acme.orders.created``); its stream is
            ``EVENTS_acme_orders_created``.
        message: the protobuf class every event on it is.
        max_age: seconds events are kept (``None``: kept until the stream's limits).
        duplicate_window: seconds within which a republished message id is stored once.
        partitions: 0 (default): events are handled in any order, concurrently. N > 0:
            events are published with a ``key`` and stored on ``<name>.<partition>``
            (partition = CRC-32 of the key mod N); a group handles each partition one
            event at a time, in order (redeliveries included), so events of one key are
            handled in the order they were published, by however many members.
    """

    name: str
    message: type[M]
    max_age: float | None = None
    duplicate_window: float = 120.0
    partitions: int = 0
    type_name: str = field(init=False)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"topic name must be dotted words (letters, digits, _ or -), got {self.name!r}")
        if self.partitions < 0:
            raise ConfigError(f"partitions must be >= 0, got {self.partitions!r}")
        object.__setattr__(self, "type_name", self.message.DESCRIPTOR.full_name)

    @property
    def stream(self) -> StreamSpec:
        """The stream the topic's events are stored in."""
        subjects = (f"{self.name}.*",) if self.partitions else (self.name,)
        return StreamSpec(
            stream_name("EVENTS", self.name), subjects, duplicate_window=self.duplicate_window, max_age=self.max_age
        )

    def subject_for(self, key: str | None) -> str:
        """The subject an event with ``key`` is published on."""
        if not self.partitions:
            if key is not None:
                raise ConfigError(f"topic {self.name} is not ordered (partitions=0): publish without key")
            return self.name
        if key is None:
            raise ConfigError(f"topic {self.name} is ordered by key: publish with key=")
        return f"{self.name}.{zlib.crc32(key.encode()) % self.partitions}"

    @property
    def dead_letter_subject(self) -> str:
        """Where events that could not be handled go, with the reason in ``rpcframe-dead-reason``."""
        return f"dlq.{self.name}"

    @property
    def dead_letters(self) -> StreamSpec:
        """The stream dead letters are stored in (kept until removed)."""
        return StreamSpec(stream_name("DLQ", self.name), (self.dead_letter_subject,))
