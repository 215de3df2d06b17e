"""``Events``: typed publishing and consumer groups over one broker connection."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import Message

from ._client import BaseEvents
from ._consumer import Consumer, Handler
from ._topic import Topic

__all__ = ["Events"]

M = TypeVar("M", bound=Message)


class Events(BaseEvents):
    """Typed publish and consume over one broker connection.

    ``publisher`` names this process in every event's ``rpcframe-publisher``
    header (default ``host/pid``).
    """

    def consumer(self, topic: Topic[M], group: str, handler: Handler[M], **options: Any) -> Consumer[M]:
        """A member of consumer group ``group`` on ``topic`` (see :class:`Consumer` for options)."""
        return Consumer(self, topic, group, handler, **options)
