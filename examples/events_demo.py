"""The events act of ``make demo``: an RPC publishes an event, a group of two bills it, one is killed -9.

``python -m examples.events_demo`` starts a nats-server (JetStream, temporary
store, loopback), compiles ``examples/events_protos`` with ``rpcframe codegen``
(typed topic and publisher), serves ``OrderService.PlaceOrder`` on an asyncio
rpcframe server (each call publishes ``OrderCreated``), and starts two billing
processes in consumer group ``billing`` that bill each order exactly once (the
SQLite idempotent-consumer helper). Midway one is killed with SIGKILL and
restarted: nothing is lost, nothing billed twice. Then a poison message lands
in the dead-letter subject with its reason. Exits non-zero if anything fails;
prints a note and exits 0 where nats-server is not installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# grpc C-core reads this when it starts; its log lines would only repeat what the act prints (as the CLI does).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import rpcframe
import rpcframe.aio
from rpcframe.codegen import generate
from rpcframe.events import DEAD_REASON, EventContext, Events, SqliteProcessedIds, Topic, once
from tests.events.natsserver import NatsServer, nats_server_binary

ROOT = Path(__file__).resolve().parents[1]
PROTOS = Path(__file__).resolve().parent / "events_protos"
ORDERS = 1000
WINDOW = 20  # orders placed at once


def billed(db: Path) -> tuple[int, int]:
    """(bill rows, distinct orders billed)."""
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bills (order_id TEXT, cents INTEGER)")
        rows, distinct = conn.execute("SELECT count(*), count(DISTINCT order_id) FROM bills").fetchone()
    return int(rows), int(distinct)


async def billing_member(url: str, db: str) -> None:
    """One member of group "billing" (run in its own process): bill each order once, until SIGTERM."""
    from shopgen.acme.shop.v1 import orders_events  # type: ignore[import-not-found]

    store = SqliteProcessedIds(db)
    store.connection.execute("CREATE TABLE IF NOT EXISTS bills (order_id TEXT, cents INTEGER)")

    def bill(event: Any, ctx: EventContext) -> None:
        store.connection.execute("INSERT INTO bills VALUES (?, ?)", (event.order_id, event.cents))

    events = await Events.connect(url, publisher=f"billing-{os.getpid()}")
    consumer = events.consumer(orders_events.ORDER_CREATED, "billing", once(store, bill), ack_wait=2.0, concurrency=8)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await consumer.start()
    print("ready", flush=True)
    await stop.wait()
    await consumer.stop()
    await events.close()


def start_member(url: str, db: Path, gen: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), gen])}
    args = [sys.executable, "-m", "examples.events_demo", "--billing", url, str(db)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline() != "ready\n":
        proc.kill()
        raise SystemExit("billing process failed to start")
    return proc


async def wait_for(check: Any, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if await asyncio.to_thread(check):
            return True
        await asyncio.sleep(0.05)
    return False


async def act(nats: NatsServer, gen: str, workdir: Path) -> int:
    from shopgen.acme.shop.v1 import orders_events, orders_pb2, orders_pb2_grpc  # type: ignore[import-not-found]

    events = await Events.connect(nats.url, publisher="order-service")
    publisher = orders_events.OrdersPublisher(events)

    class Orders(orders_pb2_grpc.OrderServiceServicer):  # type: ignore[misc]
        async def PlaceOrder(self, request: Any, context: Any) -> Any:
            event = orders_pb2.OrderCreated(order_id=request.order_id, cents=request.cents)
            await publisher.order_created(event, msg_id=request.order_id)  # a retried call publishes once
            return orders_pb2.PlaceOrderResponse(order_id=request.order_id)

    # No admission control: this act is about the events, not about shedding the demo's own burst of orders.
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1, overload=None))
    server.add(Orders())
    target = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    await server.start()
    db = workdir / "billing.db"
    members = [start_member(nats.url, db, gen), start_member(nats.url, db, gen)]
    print(f"nats-server -js on {nats.url}; order service on {target}; billing pids {[m.pid for m in members]}")
    try:
        async with rpcframe.aio.connect(target, rpcframe.ChannelConfig(default_timeout=10)) as channel:
            stub = channel.stub(orders_pb2_grpc.OrderServiceStub)

            async def place_all() -> None:
                for base in range(0, ORDERS, WINDOW):
                    ids = range(base, min(base + WINDOW, ORDERS))
                    requests = [orders_pb2.PlaceOrderRequest(order_id=f"o-{i}", cents=100 + i) for i in ids]
                    await asyncio.gather(*(stub.PlaceOrder(request) for request in requests))

            placing = asyncio.create_task(place_all())
            # Kill one member mid-stream, with events in its hands, once a quarter are billed.
            if not await wait_for(lambda: billed(db)[1] >= ORDERS // 4, 60):
                raise SystemExit("billing made no progress")
            os.kill(members[0].pid, signal.SIGKILL)
            members[0].wait()
            print(f"billing pid {members[0].pid} killed with SIGKILL after {billed(db)[1]} orders were billed")
            members[0] = start_member(nats.url, db, gen)
            await placing
        print(f"{ORDERS} orders placed through the RPC, each publishing OrderCreated")
        done = await wait_for(lambda: billed(db)[1] >= ORDERS, 60)
        rows, distinct = billed(db)
        print(
            f"billed: {distinct} orders, {rows} bills (0 lost, 0 billed twice: {done and rows == distinct == ORDERS})"
        )
        topic: Topic[Any] = orders_events.ORDER_CREATED
        await events.publish_raw(topic.stream, topic.name, b"\xff\x00 not an OrderCreated", {}, "poison-1")
        dead = None
        for _ in range(400):  # 20 s at most
            dead = await events.broker.last(topic.dead_letters.name, topic.dead_letter_subject)
            if dead is not None:
                break
            await asyncio.sleep(0.05)
        reason = dead.headers.get(DEAD_REASON) if dead is not None else None
        print(f"poison message -> {topic.dead_letter_subject}: {reason}")
        return 0 if done and rows == distinct == ORDERS and reason else 1
    finally:
        for member in members:
            if member.poll() is None:
                member.send_signal(signal.SIGTERM)
                try:
                    member.wait(15)
                except subprocess.TimeoutExpired:
                    member.kill()
                    member.wait()
            assert member.stdout is not None
            member.stdout.close()
        await server.stop(0)
        await events.close()


def main() -> int:
    """Run the act; returns the exit code."""
    binary = nats_server_binary()
    if binary is None:
        print("events act skipped: nats-server not installed (make system installs it as root)")
        return 0
    nats = NatsServer(binary)
    nats.start()
    workdir = Path(tempfile.mkdtemp(prefix="rpcframe-events-demo-"))
    try:
        generate(PROTOS, workdir / "shopgen")
        sys.path.insert(0, str(workdir))
        return asyncio.run(act(nats, str(workdir), workdir))
    finally:
        nats.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--billing"]:
        asyncio.run(billing_member(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(main())
