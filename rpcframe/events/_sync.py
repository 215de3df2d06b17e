"""Publishing from plain (thread) code: thread-pool servicers, scripts, sync handlers.

The connection lives on an event loop in a background thread; :meth:`SyncEvents.publish`
builds the event's headers in the calling thread (so the handler's deadline,
criticality and trace context go with it) and blocks until the stream
acknowledged it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message

from ._client import Published
from ._events import Events
from ._topic import Topic

__all__ = ["SyncEvents"]

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class SyncEvents:
    """A blocking :class:`Events` (its asyncio connection runs in a daemon thread)::

    events = SyncEvents.connect("nats://127.0.0.1:4222", publisher="orders")
    events.publish(ORDER_CREATED, OrderCreated(order_id="o-1"), msg_id="o-1")
    events.close()
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, events: Events) -> None:
        self._loop, self._thread, self.events = loop, thread, events

    @classmethod
    def connect(
        cls,
        servers: str | Sequence[str],
        *,
        publisher: str | None = None,
        within: float = 5.0,
        nats_options: Mapping[str, Any] | None = None,
    ) -> SyncEvents:
        """Start the loop thread and connect (raises BrokerUnavailable like :meth:`Events.connect`)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="rpcframe-events", daemon=True)
        thread.start()
        try:
            future = asyncio.run_coroutine_threadsafe(
                Events.connect(servers, publisher=publisher, within=within, nats_options=nats_options), loop
            )
            events = future.result(within + 5)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()
            raise
        return cls(loop, thread, events)

    def publish(
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
        """Store ``event`` on ``topic`` and wait for the acknowledgement (see :meth:`Events.publish`)."""
        # Headers here, in the caller's thread: its context variables hold the deadline and trace.
        subject, headers = self.events.outgoing(topic, event, key, ttl, inherit_deadline)
        coro = self.events.publish_raw(topic.stream, subject, event.SerializeToString(), headers, msg_id, within)
        return self.run(coro, within + 5)

    def run(self, coro: Coroutine[Any, Any, T], within: float) -> T:
        """Run a coroutine of the connection's loop and wait for its result (at most ``within`` s)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("SyncEvents called from its own loop thread: use the async Events there")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(within)

    def close(self) -> None:
        """Close the connection and stop the loop thread."""
        if self._loop.is_closed():
            return
        try:
            self.run(self.events.close(), 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
