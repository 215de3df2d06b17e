"""Consuming typed events: competing consumers, explicit acks, backoff, dead letters, bounded concurrency."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from ..errors import ConfigError
from . import _headers
from ._broker import BrokerMessage, BrokerUnavailable, Pull, StreamSpec
from ._client import BaseEvents, PublishError
from ._topic import Topic

__all__ = ["Consumer", "EventContext", "Handler", "Pump", "Stats"]

M = TypeVar("M", bound=Message)
log = logging.getLogger("rpcframe.events")


class EventContext:
    """What a handler knows about the event besides its payload.

    Attributes: ``msg_id``, ``subject``, ``attempt`` (1 on the first
    delivery), ``publisher`` (the ``rpcframe-publisher`` header) and ``headers``.
    """

    __slots__ = ("attempt", "headers", "msg_id", "publisher", "subject")

    def __init__(self, msg_id: str, subject: str, attempt: int, publisher: str, headers: Mapping[str, str]) -> None:
        self.msg_id, self.subject, self.attempt, self.publisher, self.headers = (
            msg_id, subject, attempt, publisher, headers,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"EventContext(msg_id={self.msg_id!r}, subject={self.subject!r}, attempt={self.attempt})"


Handler = Callable[[M, EventContext], Awaitable[None]] | Callable[[M, EventContext], None]


@dataclass
class Stats:
    """Counts of what a consumer did (read them in tests, health and metrics)."""

    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reasons: list[str] = field(default_factory=list)  # the last few dead-letter reasons


class Pump:
    """Fetches deliveries for a durable group and processes each under a concurrency bound.

    Subclasses implement :meth:`process`. :meth:`stop` stops fetching, lets the
    deliveries in hand finish (and ack), then returns; a stopped member is not
    started again (make a new one).
    """

    def __init__(
        self,
        events: BaseEvents,
        stream: StreamSpec,
        subject: str,
        group: str,
        dead: StreamSpec,
        dead_subject: str,
        *,
        max_deliveries: int = 5,
        concurrency: int = 16,
        ack_wait: float = 30.0,
        backoff: tuple[float, ...] = (0.1, 0.5, 2.0),
        confirm_acks: bool = False,
        fetch_wait: float = 0.5,
        partitions: int = 0,
    ) -> None:
        if max_deliveries < 1 or concurrency < 1 or ack_wait <= 0 or fetch_wait <= 0:
            raise ConfigError("max_deliveries and concurrency must be >= 1, ack_wait and fetch_wait > 0")
        if not _headers.valid_group(group):
            raise ConfigError(f"group must be letters, digits, _ or -, got {group!r}")
        self.events, self.stream, self.subject, self.group = events, stream, subject, group
        self.dead, self.dead_subject = dead, dead_subject
        self.max_deliveries, self.concurrency, self.ack_wait = max_deliveries, concurrency, ack_wait
        self.backoff, self.confirm_acks, self.fetch_wait = backoff or (0.0,), confirm_acks, fetch_wait
        self.partitions = partitions
        self.stats = Stats()
        self._stopping = asyncio.Event()
        self._task: asyncio.Future[Any] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._pulls: list[Pull] = []
        self._refill = max(1, concurrency // 2)
        self._in_hand = 0  # deliveries fetched and not yet answered
        self._room = asyncio.Event()  # set when a fetch may be made
        self._busy: dict[BrokerMessage, float] = {}  # deliveries whose handler runs -> when it started

    async def start(self) -> None:
        """Join the group and start fetching in the background."""
        await self.events.ensure(self.stream)
        await self.events.ensure(self.dead)
        # One more delivery than handler runs: a message whose handler never answered (crash, ack_wait)
        # comes back once more and is dead-lettered here with the reason, instead of vanishing.
        pull = self.events.broker.pull
        deliver = self.max_deliveries + 1
        if self.partitions:
            # One durable per partition, one delivery of it in flight across the group: in order.
            for i in range(self.partitions):
                self._pulls.append(await pull(
                    self.stream.name, f"{self.subject}.{i}", f"{self.group}-p{i}", max_deliver=deliver,
                    ack_wait=self.ack_wait, max_ack_pending=1,
                ))  # fmt: skip
            self._task = asyncio.gather(*(self._run_in_order(p) for p in self._pulls))
        else:
            self._pulls.append(await pull(self.stream.name, self.subject, self.group, max_deliver=deliver,
                                          ack_wait=self.ack_wait))  # fmt: skip
            self._task = asyncio.create_task(self._run(self._pulls[0]), name=f"rpcframe-events-{self.group}")
        self._ticker = asyncio.create_task(self._keep_alive(), name=f"rpcframe-events-{self.group}-alive")

    async def stop(self, grace: float | None = None) -> None:
        """Stop fetching, finish and ack the deliveries in hand, leave the group's position on the broker.

        Handlers still running after ``grace`` seconds (``None``: no limit) are
        cancelled; their deliveries come back after ``ack_wait``, to this group.
        """
        self._stopping.set()
        self._room.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for pull in self._pulls:
            await pull.close()
        self._pulls = []

    @property
    def name(self) -> str:
        """How health and logs name this member: ``events:<subject>/<group>``."""
        return f"events:{self.subject}/{self.group}"

    @property
    def healthy(self) -> bool:
        """Fetching, and connected to the broker."""
        return self._task is not None and not self._task.done() and self.events.broker.connected

    async def __aenter__(self) -> Pump:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self, pull: Pull) -> None:
        # `concurrency` long-lived workers take deliveries from a queue: cheaper than a task per delivery.
        queue: asyncio.Queue[BrokerMessage | None] = asyncio.Queue()
        workers = [asyncio.create_task(self._work(queue)) for _ in range(self.concurrency)]
        pause = 0.05
        while not self._stopping.is_set():
            # Fetch when half the slots are free: one round trip per batch, not per finished handler.
            if self.concurrency - self._in_hand < self._refill:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                batch = await pull.fetch(self.concurrency - self._in_hand, self.fetch_wait)
            except BrokerUnavailable:
                # Broker restarting: the client reconnects; back off instead of spinning.
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            pause = 0.05
            if self._stopping.is_set():
                # Fetched while stopping: hand them back at once rather than start new work.
                await asyncio.gather(*(msg.nak(0) for msg in batch), return_exceptions=True)
                break
            self._in_hand += len(batch)
            for msg in batch:
                queue.put_nowait(msg)
        for _ in workers:
            queue.put_nowait(None)  # after the deliveries in hand: they finish and are acked first
        await asyncio.gather(*workers)

    async def _run_in_order(self, pull: Pull) -> None:
        """One partition: fetch one delivery, handle it, answer it, then the next."""
        pause = 0.05
        while not self._stopping.is_set():
            try:
                batch = await pull.fetch(1, self.fetch_wait)
            except BrokerUnavailable:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            pause = 0.05
            for msg in batch:
                if self._stopping.is_set():
                    await msg.nak(0)  # fetched while stopping: back to the partition, still first in line
                else:
                    await self._guarded(msg)

    async def _work(self, queue: asyncio.Queue[BrokerMessage | None]) -> None:
        while (msg := await queue.get()) is not None:
            await self._guarded(msg)
            self._in_hand -= 1
            if self.concurrency - self._in_hand >= self._refill:
                self._room.set()

    async def _guarded(self, msg: BrokerMessage) -> None:
        try:
            await self.process(msg)
        except (BrokerUnavailable, PublishError):
            pass  # its ack, nack or dead letter did not reach the broker: it is redelivered after ack_wait
        except Exception:  # noqa: BLE001 - a worker must survive anything, or the consumer stalls
            log.exception("processing a delivery on %s failed; it will be redelivered", self.subject)

    async def process(self, msg: BrokerMessage) -> None:
        """Handle one delivery: ack, nak or dead-letter it."""
        raise NotImplementedError

    def delay(self, attempt: int) -> float:
        """Redelivery delay after the ``attempt``-th failed delivery."""
        return self.backoff[min(attempt, len(self.backoff)) - 1]

    async def dead_letter(
        self, msg: BrokerMessage, reason: str, then: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Store ``msg`` on the dead-letter subject with ``reason``, run ``then``, never deliver it again."""
        headers = {k: v for k, v in msg.headers.items() if k != _headers.MSG_ID}
        headers[_headers.DEAD_REASON] = reason[:1000]
        headers[_headers.DEAD_GROUP] = self.group
        headers[_headers.DEAD_DELIVERIES] = str(msg.delivery_count)
        headers[_headers.DEAD_SUBJECT] = msg.subject
        original = msg.headers.get(_headers.MSG_ID) or f"{msg.subject}:{id(msg)}"
        # A dead letter keeps the original id (plus a suffix): dead-lettering it twice stores it once.
        await self.events.publish_raw(self.dead, self.dead_subject, msg.data, headers, f"{original}:dead", 10.0)
        if then is not None:
            await then()
        await msg.term()
        self.stats.dead_lettered += 1
        self.stats.reasons = [*self.stats.reasons[-9:], reason]

    @contextmanager
    def busy(self, msg: BrokerMessage) -> Iterator[None]:
        """While the block runs, the broker is told the delivery is in progress before ``ack_wait`` ends."""
        self._busy[msg] = time.monotonic()
        try:
            yield
        finally:
            del self._busy[msg]

    async def _keep_alive(self) -> None:
        """One timer for every running handler (a task per delivery would cost more than short handlers)."""
        period = self.ack_wait / 3
        while True:
            await asyncio.sleep(period)
            due = time.monotonic() - period
            for msg, started in list(self._busy.items()):
                if started <= due:
                    try:
                        await msg.in_progress()
                    except Exception:  # noqa: BLE001 - broker away: the delivery may come back, as without us
                        continue


class Consumer(Pump, Generic[M]):
    """A member of a durable consumer group on a typed topic.

    Every event goes to one member of the group; start more processes with the
    same group to scale out. The handler (``async def`` or plain; a plain one
    runs in a worker thread) gets the parsed event and an :class:`EventContext`.
    Returning acks the event; raising nacks it with a backoff delay, and after
    ``max_deliveries`` failed runs it is dead-lettered with the reason. An event
    that does not parse as the topic's type, whose deadline passed, or whose
    handler never answered ``max_deliveries`` times (crashes) is dead-lettered
    without running. Long handlers extend their ack deadline on their own.

    On a topic with ``partitions`` each partition's events are handled one at a
    time, in order (``concurrency`` does not apply: up to one per partition).

    Options: ``max_deliveries`` (5), ``concurrency`` (16 handlers at once),
    ``ack_wait`` (30 s), ``backoff`` (delays of the 1st, 2nd... redelivery),
    ``confirm_acks`` (wait for the broker to confirm each ack; a crash then
    redelivers only events whose ack was not confirmed), ``fetch_wait``.
    """

    def __init__(self, events: BaseEvents, topic: Topic[M], group: str, handler: Handler[M], **options: object) -> None:
        super().__init__(
            events,
            topic.stream,
            topic.name,
            group,
            topic.dead_letters,
            topic.dead_letter_subject,
            partitions=topic.partitions,
            **options,  # type: ignore[arg-type]
        )
        self.topic = topic
        self.handler = handler
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - an instance with async __call__
        )
        self.on_acked: Callable[[str], None] | None = None  # tests: called once an ack was sent (confirmed)

    async def process(self, msg: BrokerMessage) -> None:
        """Parse, check, run the handler, then ack / nak / dead-letter."""
        attempt = msg.delivery_count
        if attempt > self.max_deliveries:
            return await self.dead_letter(
                msg, f"delivered {attempt - 1} times without an answer (handler crashed or exceeded ack_wait)"
            )
        headers = msg.headers
        sent_type = headers.get(_headers.TYPE)
        if sent_type is not None and sent_type != self.topic.type_name:
            return await self.dead_letter(msg, f"type {sent_type} is not the topic's {self.topic.type_name}")
        try:
            event = self.topic.message.FromString(msg.data)
        except DecodeError as exc:
            return await self.dead_letter(msg, f"does not parse as {self.topic.type_name}: {exc}")
        left = _headers.remaining(headers)
        if left is not None and left <= 0:
            return await self.dead_letter(msg, f"deadline passed {-left:.3f} s before delivery")
        ctx = EventContext(
            headers.get(_headers.MSG_ID, ""), msg.subject, attempt, headers.get(_headers.PUBLISHER, ""), headers
        )
        try:
            await self._call(event, ctx, msg, left)
        except Exception as exc:  # noqa: BLE001 - any handler failure is a nack, never a consumer crash
            self.stats.failed += 1
            if attempt >= self.max_deliveries:
                return await self.dead_letter(msg, f"handler failed {attempt} times; last: {exc!r}")
            return await msg.nak(self.delay(attempt))
        await msg.ack(self.confirm_acks)
        self.stats.handled += 1
        if self.on_acked is not None:
            self.on_acked(ctx.msg_id)

    async def _call(self, event: M, ctx: EventContext, msg: BrokerMessage, left: float | None) -> None:
        with self.busy(msg), _headers.handler_context(msg.headers, left):
            if self._is_async:
                await self.handler(event, ctx)  # type: ignore[misc]
            else:
                await asyncio.to_thread(self.handler, event, ctx)
