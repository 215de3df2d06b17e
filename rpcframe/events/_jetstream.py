"""The NATS JetStream driver of the broker seam (needs the ``events`` extra: nats-py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from ..errors import ConfigError
from ._broker import BrokerUnavailable, Listener, StoredMessage, StreamSpec

__all__ = ["JetStreamBroker", "connect"]

# Errors after which the same call may succeed once the server is back (restart, reconnect, leader change).
_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
)


_RECONNECT_WAIT = 0.1


async def _quiet(_: Exception) -> None:
    """nats-py reports each failed reconnect attempt; the caller sees BrokerUnavailable instead."""


async def connect(
    servers: str | Sequence[str],
    *,
    name: str | None = None,
    within: float = 5.0,
    nats_options: Mapping[str, Any] | None = None,
) -> JetStreamBroker:
    """Connect to NATS (reconnecting forever on loss) and return the JetStream broker.

    ``nats_options`` go to ``nats.connect`` as they are: ``tls`` (an
    ``ssl.SSLContext``), ``tls_hostname``, ``user``/``password``, ``token``,
    ``user_credentials``, ``nkeys_seed`` ... (the broker's own authentication).
    """
    try:
        nc = await nats.connect(
            **(nats_options or {}),
            servers=list(servers) if not isinstance(servers, str) else servers,
            name=name,
            connect_timeout=within,
            allow_reconnect=True,
            # Bounded while connecting (nats-py would try forever), unbounded once connected (below).
            max_reconnect_attempts=max(1, int(within / _RECONNECT_WAIT)),
            reconnect_time_wait=_RECONNECT_WAIT,
            error_cb=_quiet,
        )
    except (OSError, nats.errors.Error, *_TRANSIENT) as exc:  # refused, unreachable, or not authorized
        raise BrokerUnavailable(f"cannot connect to NATS at {servers}: {exc!r}") from exc
    nc.options["max_reconnect_attempts"] = -1  # a broker restart later must not end the connection
    return JetStreamBroker(nc)


class _Delivery:
    """A JetStream delivery seen through the :class:`BrokerMessage` protocol."""

    __slots__ = ("_msg",)

    def __init__(self, msg: Msg) -> None:
        self._msg = msg

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._msg.headers or {}

    @property
    def delivery_count(self) -> int:
        return int(self._msg.metadata.num_delivered)

    async def ack(self, confirm: bool = False) -> None:
        try:
            if confirm:
                await self._msg.ack_sync(timeout=5.0)
            else:
                await self._msg.ack()
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"ack not confirmed: {exc!r}") from exc

    async def nak(self, delay: float) -> None:
        await self._msg.nak(delay=delay if delay > 0 else None)

    async def in_progress(self) -> None:
        await self._msg.in_progress()

    async def term(self) -> None:
        await self._msg.term()


class _Pull:
    __slots__ = ("_sub",)

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def fetch(self, batch: int, within: float) -> Sequence[_Delivery]:
        try:
            msgs = await self._sub.fetch(batch, timeout=within)
        except nats.errors.TimeoutError:
            return []
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"fetch failed: {exc!r}") from exc
        return [_Delivery(m) for m in msgs]

    async def close(self) -> None:
        try:
            await self._sub.unsubscribe()
        except (nats.errors.Error, *_TRANSIENT):
            pass  # the connection is going away anyway


class _Listener:
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def __aiter__(self) -> AsyncIterator[StoredMessage]:
        async for msg in self._sub.messages:
            yield StoredMessage(msg.subject, msg.data, msg.headers or {})


class JetStreamBroker:
    """:class:`~rpcframe.events.Broker` on one nats-py connection."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream (file storage) unless it exists."""
        config = api.StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            duplicate_window=spec.duplicate_window,
            max_age=spec.max_age,
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.WORK_QUEUE if spec.work_queue else api.RetentionPolicy.LIMITS,
            allow_direct=True,
        )
        try:
            await self.js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as refused:
                try:
                    await self.js.stream_info(spec.name)  # created meanwhile by another process
                except nats.js.errors.NotFoundError:  # refused for its own sake, e.g. subjects another stream holds
                    raise ConfigError(f"the broker refused stream {spec.name} for {', '.join(spec.subjects)}: "
                                      f"{refused.description}") from None  # fmt: skip
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"stream {spec.name}: {exc!r}") from exc

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str], *, msg_id: str, within: float
    ) -> tuple[int, bool]:
        """Publish with ``Nats-Msg-Id`` and wait for the stream's acknowledgement."""
        hdrs = dict(headers)
        hdrs["Nats-Msg-Id"] = msg_id
        try:
            ack = await self.js.publish(subject, data, timeout=within, headers=hdrs)
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"publish to {subject} not acknowledged: {exc!r}") from exc
        return int(ack.seq), bool(ack.duplicate)

    async def pull(
        self, stream: str, subject: str, group: str, *, max_deliver: int, ack_wait: float, max_ack_pending: int = -1
    ) -> _Pull:
        """A pull subscription on the durable consumer ``group`` (explicit acks)."""
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
        )
        config.durable_name = config.name = group
        config.filter_subject = subject
        try:
            try:
                # Create, or update an existing group to these settings (ack_wait, max_deliver).
                await self.js.add_consumer(stream, config)
            except nats.js.errors.BadRequestError:
                pass  # a setting the broker cannot change on a live group: keep the group as it is
            sub = await self.js.pull_subscribe_bind(durable=group, stream=stream)
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"consumer {group} on {stream}: {exc!r}") from exc
        return _Pull(sub)

    async def last(self, stream: str, subject: str) -> StoredMessage | None:
        """The last message stored on ``subject`` (direct get)."""
        try:
            raw = await self.js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return None
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"get {subject}: {exc!r}") from exc
        return StoredMessage(subject, raw.data or b"", dict(raw.headers or {}))

    @asynccontextmanager
    async def listen(self, subject: str) -> AsyncIterator[Listener]:
        """A core NATS subscription for the block's duration."""
        sub = await self.nc.subscribe(subject)
        try:
            yield _Listener(sub)
        finally:
            await sub.unsubscribe()

    @property
    def connected(self) -> bool:
        """Whether nats-py is connected now."""
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        """Drain and close the connection."""
        if not self.nc.is_closed:
            await self.nc.close()
