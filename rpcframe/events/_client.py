"""Publishing typed events: at-least-once with the stream's acknowledgement, stored once per message id."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from google.protobuf.message import Message

from ..errors import ConfigError
from . import _headers
from ._broker import Broker, BrokerUnavailable, StreamSpec
from ._topic import Topic

__all__ = ["BaseEvents", "PublishError", "Published"]

M = TypeVar("M", bound=Message)


class PublishError(Exception):
    """The broker did not acknowledge the event within the publish timeout (it may or may not be stored)."""


@dataclass(frozen=True)
class Published:
    """The stream's acknowledgement of one event."""

    msg_id: str
    sequence: int
    duplicate: bool


def _default_identity() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class BaseEvents:
    """Typed publishing over one broker connection (:class:`~rpcframe.events.Events` adds consumers).

    ``publisher`` names this process in every event's ``rpcframe-publisher``
    header (default ``host/pid``).
    """

    def __init__(self, broker: Broker, *, publisher: str | None = None) -> None:
        self.broker = broker
        self.publisher = publisher or _default_identity()
        self._ready: set[str] = set()

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str],
        *,
        publisher: str | None = None,
        within: float = 5.0,
        nats_options: Mapping[str, Any] | None = None,
    ) -> Self:
        """Events on NATS JetStream at ``servers`` (``nats://127.0.0.1:4222``); gives up after ``within`` s.

        ``nats_options``: passed to ``nats.connect`` (TLS context, token, user
        credentials ...). Raises :class:`BrokerUnavailable` when no server
        answered or it refused the credentials. Once connected, the connection
        is re-established for as long as it takes.
        """
        from ._jetstream import connect

        broker = await connect(servers, name=publisher, within=within, nats_options=nats_options)
        return cls(broker, publisher=publisher)

    async def ensure(self, spec: StreamSpec) -> None:
        """Create a stream once per connection (publishing and consuming call this)."""
        if spec.name not in self._ready:
            await self.broker.ensure_stream(spec)
            self._ready.add(spec.name)

    async def publish(
        self,
        topic: Topic[M],
        event: M,
        *,
        msg_id: str | None = None,
        key: str | None = None,
        ttl: float | None = None,
        inherit_deadline: bool = True,
        within: float = 30.0,
    ) -> Published:
        """Store ``event`` on ``topic``; returns once the stream acknowledged it.

        ``key``: for a topic with ``partitions``, events of one key are handled in publish order.

        ``msg_id`` (default a random one) makes a retried publish store once: pass
        your own (an order id, say) to make a republish after a crash a no-op.
        Transient failures (broker restarting) are retried with the same id until
        ``within`` s have passed. ``ttl`` bounds how long the event stays worth
        handling; inside an RPC handler or a deadline block the event also carries
        that deadline unless ``inherit_deadline`` is false.

        Raises:
            TypeError: ``event`` is not the topic's message type.
            PublishError: not acknowledged within ``within`` s.
        """
        subject, headers = self.outgoing(topic, event, key, ttl, inherit_deadline)
        return await self.publish_raw(topic.stream, subject, event.SerializeToString(), headers, msg_id, within)

    def outgoing(
        self, topic: Topic[M], event: M, key: str | None, ttl: float | None, inherit_deadline: bool
    ) -> tuple[str, dict[str, str]]:
        """The subject and headers ``event`` is published with (checks its type and ``ttl``).

        Reads the caller's deadline and trace context: call it in the caller's thread.
        """
        if ttl is not None and ttl <= 0:
            raise ConfigError(f"ttl must be > 0 seconds, got {ttl!r}")
        if type(event) is not topic.message:
            raise TypeError(f"topic {topic.name} carries {topic.type_name}, not {type(event).__name__}")
        headers = _headers.outgoing(topic.type_name, self.publisher, ttl, inherit_deadline)
        if key is not None:
            headers[_headers.KEY] = key
        return topic.subject_for(key), headers

    async def publish_raw(
        self,
        stream: StreamSpec,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        msg_id: str | None = None,
        within: float = 30.0,
    ) -> Published:
        """Publish bytes with retries under one message id (the typed paths end here)."""
        if within <= 0:
            raise ConfigError(f"publish within must be > 0, got {within!r}")
        msg_id = msg_id or uuid.uuid4().hex
        if stream.name not in self._ready:
            await self._ensure_retrying(stream, within)
        try:  # the common case: acknowledged at the first try
            seq, dup = await self.broker.publish(subject, data, headers, msg_id=msg_id, within=min(2.0, within))
            return Published(msg_id, seq, dup)
        except BrokerUnavailable:
            pass
        end = time.monotonic() + within
        pause = 0.05
        while True:
            left = end - time.monotonic()
            try:
                await self.ensure(stream)
                seq, dup = await self.broker.publish(subject, data, headers, msg_id=msg_id, within=min(2.0, left))
                return Published(msg_id, seq, dup)
            except BrokerUnavailable as exc:
                if left <= pause:
                    raise PublishError(f"{subject}: not acknowledged within {within} s: {exc}") from exc
                # The same id on every try: the stream's duplicate window stores it once.
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def _ensure_retrying(self, stream: StreamSpec, within: float) -> None:
        """Create the stream, retrying while the broker is away (bounded by ``within``)."""
        end, pause = time.monotonic() + within, 0.05
        while True:
            try:
                return await self.ensure(stream)
            except BrokerUnavailable as exc:
                if end - time.monotonic() <= pause:
                    raise PublishError(f"stream {stream.name}: broker unavailable for {within} s: {exc}") from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def close(self) -> None:
        """Close the broker connection."""
        await self.broker.close()
