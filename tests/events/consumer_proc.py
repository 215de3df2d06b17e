"""A consumer-group member in its own process, for the kill -9 tests.

``python -m tests.events.consumer_proc URL TOPIC GROUP DB LOG``: handles
EchoRequest events on TOPIC in GROUP through the SQLite idempotent helper (the
handler's effect, a row in ``effects``, commits with the processed id), logs
``h <msg_id> <ns>`` when a delivery reaches the handler and ``a <msg_id> <ns>``
once its ack was confirmed, prints ``ready``, and on SIGTERM stops fetching,
finishes and acks what it holds, then exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import EventContext, Events, SqliteProcessedIds, Topic, once


async def main(url: str, topic_name: str, group: str, db: str, log_path: str) -> None:
    store = SqliteProcessedIds(db)
    store.connection.execute("CREATE TABLE IF NOT EXISTS effects (msg_id TEXT, message TEXT)")
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def note(kind: str, msg_id: str) -> None:
        os.write(log, f"{kind} {msg_id} {time.monotonic_ns()}\n".encode())  # one write: whole line or nothing

    def effect(event: pb.EchoRequest, ctx: EventContext) -> None:
        store.connection.execute("INSERT INTO effects VALUES (?, ?)", (ctx.msg_id, event.message))

    handle_once = once(store, effect)

    def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        note("h", ctx.msg_id)
        handle_once(event, ctx)

    events = await Events.connect(url, publisher=f"consumer-{os.getpid()}")
    topic = Topic(topic_name, pb.EchoRequest)
    consumer = events.consumer(topic, group, handle, ack_wait=2.0, confirm_acks=True, concurrency=8)
    consumer.on_acked = lambda msg_id: note("a", msg_id)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await consumer.start()
    print("ready", flush=True)
    await stop.wait()
    await consumer.stop()
    await events.close()
    store.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
