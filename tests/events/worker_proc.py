"""``python -m tests.events.worker_proc URL ACK_WAIT``: an order-service worker process (ORDERS_LOG logs runs).

Prints ``ready`` once it joined the work queue; SIGTERM finishes what it holds, then exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from rpcframe.events import Events, Worker
from tests.events.orders_service import AioOrders


async def main(url: str, ack_wait: str) -> None:
    events = await Events.connect(url, publisher="worker")
    worker = Worker(events, AioOrders(), ack_wait=float(ack_wait), max_deliveries=3)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.start()
    print("ready", flush=True)
    await stop.wait()
    await worker.stop()
    await events.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
