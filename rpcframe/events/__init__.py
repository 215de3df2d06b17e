"""Event-driven and asynchronous messaging on a persistent broker (NATS JetStream).

Needs the ``events`` extra (``pip install 'rpcframe[events]'``: nats-py);
``import rpcframe`` never imports it. Events are protobuf messages on typed
topics::

    from rpcframe.events import Events, Topic

    ORDER_CREATED = Topic("acme.orders.created", orders_pb2.OrderCreated)

    events = await Events.connect("nats://127.0.0.1:4222", publisher="orders")
    await events.publish(ORDER_CREATED, orders_pb2.OrderCreated(id="o-1"), msg_id="o-1")

    async def handle(event: orders_pb2.OrderCreated, ctx: EventContext) -> None: ...

    async with events.consumer(ORDER_CREATED, "billing", handle, max_deliveries=5):
        ...  # every member of group "billing" shares the events

The broker sits behind :class:`Broker`, a small protocol; JetStream is its
one driver.
"""

from __future__ import annotations

from ._broker import Broker, BrokerMessage, BrokerUnavailable, Pull, StoredMessage, StreamSpec
from ._calls import AsyncCalls, AsyncMethod, BrokerContext, Receipt, Worker
from ._client import BaseEvents, Published, PublishError
from ._consumer import Consumer, EventContext, Handler, Pump, Stats
from ._events import Events
from ._headers import CRITICALITY, DEAD_DELIVERIES, DEAD_GROUP, DEAD_REASON, DEAD_SUBJECT, DEADLINE, PUBLISHER, TYPE
from ._host import Subscribers
from ._idempotent import MemoryProcessedIds, ProcessedIds, SqliteProcessedIds, once
from ._sync import SyncEvents
from ._topic import Topic

__all__ = [
    "CRITICALITY",
    "DEADLINE",
    "DEAD_DELIVERIES",
    "DEAD_GROUP",
    "DEAD_REASON",
    "DEAD_SUBJECT",
    "PUBLISHER",
    "TYPE",
    "AsyncCalls",
    "AsyncMethod",
    "BaseEvents",
    "Broker",
    "BrokerContext",
    "BrokerMessage",
    "BrokerUnavailable",
    "Consumer",
    "EventContext",
    "Events",
    "Handler",
    "MemoryProcessedIds",
    "ProcessedIds",
    "PublishError",
    "Published",
    "Pull",
    "Pump",
    "Receipt",
    "Stats",
    "StoredMessage",
    "StreamSpec",
    "Subscribers",
    "SyncEvents",
    "SqliteProcessedIds",
    "Topic",
    "Worker",
    "once",
]
