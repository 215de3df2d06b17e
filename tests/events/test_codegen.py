"""rpcframe codegen's events part: `rpcframe:topic` comments become typed topics, publishers, subscribers, calls."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from rpcframe.events import EventContext, Events, Topic, Worker
from rpcframe.events._codegen import _snake
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


def test_only_files_that_declare_topics_get_an_events_module(orders_gen: Path) -> None:
    v1 = orders_gen / "evgen" / "acme" / "orders" / "v1"
    assert (v1 / "orders_events.py").exists()
    assert not (ROOT / "generated" / "rpcframe" / "echo" / "v1" / "echo_events.py").exists()
    assert _snake("OrderCreated") == "order_created"
    assert _snake("HTTPRequestSeen") == "http_request_seen"


async def test_generated_publisher_subscriber_and_calls_work_end_to_end(orders_gen: Path, events: Events) -> None:
    from evgen.acme.orders.v1 import orders_events as ev  # type: ignore[import-not-found]
    from evgen.acme.orders.v1 import orders_pb2 as pb  # type: ignore[import-not-found]

    from rpcframe.events import AsyncCalls
    from tests.events.orders_service import AioOrders

    assert isinstance(ev.ORDER_CREATED, Topic)
    assert (ev.ORDER_CREATED.name, ev.ORDER_CREATED.message) == ("acme.orders.created", pb.OrderCreated)
    assert (ev.ORDER_CREATED.partitions, ev.ORDER_SHIPPED.partitions) == (0, 4)  # "partitions=4" in its comment
    got: list[Any] = []

    class Billing(ev.OrderCreatedSubscriber):  # type: ignore[misc]
        async def handle(self, event: Any, ctx: EventContext) -> None:
            got.append(event)

    published = await ev.OrdersPublisher(events).order_created(pb.OrderCreated(order_id="g-1", item="cup"))
    assert published.sequence >= 1
    async with Billing().consumer(events, "billing"):
        await eventually(lambda: asyncio.sleep(0, bool(got)))
    assert got == [pb.OrderCreated(order_id="g-1", item="cup")]

    calls = ev.OrderServiceCalls(AsyncCalls(events))
    receipt = await calls.PlaceOrder(pb.PlaceOrderRequest(order_id="g-2", item="mug"))
    async with Worker(events, AioOrders()):
        response = await AsyncCalls(events).result(receipt, within=10)
    assert response == pb.PlaceOrderResponse(order_id="g-2", status="placed mug")


def test_mypy_refuses_a_wrong_event_or_request_type(orders_gen: Path, tmp_path: Path) -> None:
    snippet = tmp_path / "use_orders.py"
    snippet.write_text(
        "from evgen.acme.orders.v1 import orders_events as ev, orders_pb2 as pb\n"
        "from rpcframe.events import AsyncCalls, Events\n\n\n"
        "async def main(events: Events, calls: AsyncCalls) -> None:\n"
        "    await ev.OrdersPublisher(events).order_created(pb.OrderCreated(order_id='1'))\n"
        "    await events.publish(ev.ORDER_SHIPPED, pb.OrderShipped(order_id='1'))\n"
        "    await ev.OrdersPublisher(events).order_created(pb.OrderShipped(order_id='1'))  # wrong\n"
        "    await events.publish(ev.ORDER_CREATED, pb.OrderShipped(order_id='1'))  # wrong\n"
        "    receipt = await ev.OrderServiceCalls(calls).PlaceOrder(pb.GetOrderRequest())  # wrong\n"
        "    response = await calls.result(await ev.OrderServiceCalls(calls).GetOrder(pb.GetOrderRequest()))\n"
        "    reveal_type(response)\n"
    )
    args = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    env = {"MYPYPATH": str(orders_gen), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=100).stdout
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in errors] == [8, 9, 10], out
    assert 'incompatible type "OrderShipped"; expected "OrderCreated"' in errors[0]
    assert 'Revealed type is "evgen.acme.orders.v1.orders_pb2.PlaceOrderResponse"' in out
