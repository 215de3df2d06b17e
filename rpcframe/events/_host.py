"""Hosting consumers and workers in a process, next to an asyncio rpcframe server or alone.

::

    subscribers = Subscribers(events.consumer(ORDER_CREATED, "billing", handle), server=server)
    await subscribers.start()          # each one's health: SERVING under events:<subject>/<group>
    await subscribers.run_until_signal()  # SIGTERM/SIGINT: stop fetching, finish and ack, return

A subscriber is NOT_SERVING in the gRPC health service while its broker
connection is down or its fetch loop has ended, and once it is stopping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .._loop import STOP_SIGNALS, stop_signals
from ._consumer import Pump

__all__ = ["Subscribers"]


class Subscribers:
    """Start, watch and stop a set of consumers and workers together.

    ``server``: an ``rpcframe.aio.Server`` whose health service reports each
    subscriber (``check_every`` seconds). ``grace``: seconds in-flight handlers
    get to finish when stopping.
    """

    def __init__(self, *pumps: Pump, server: Any = None, check_every: float = 1.0, grace: float = 30.0) -> None:
        self.pumps: Sequence[Pump] = pumps
        self.grace = grace
        self.server = server
        self.check_every = check_every
        self._watch: asyncio.Task[None] | None = None
        self._reported: dict[str, bool] = {}

    async def start(self) -> None:
        """Start every subscriber, then report and watch their health."""
        for pump in self.pumps:
            await pump.start()
        await self._report()
        if self.server is not None:
            self._watch = asyncio.create_task(self._watch_health(), name="rpcframe-events-health")

    async def _report(self, stopping: bool = False) -> None:
        if self.server is None:
            return
        for pump in self.pumps:
            healthy = pump.healthy and not stopping
            if self._reported.get(pump.name) is not healthy:
                await self.server.set_serving(pump.name, healthy)
                self._reported[pump.name] = healthy

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            await self._report()

    async def stop(self) -> None:
        """NOT_SERVING, stop fetching, let in-flight handlers finish (``grace`` s at most) and ack, then return."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await self._report(stopping=True)
        await asyncio.gather(*(pump.stop(self.grace) for pump in self.pumps))

    async def run_until_signal(self, signals: Sequence[int] = STOP_SIGNALS) -> None:
        """Wait for one of ``signals``, then :meth:`stop`."""
        async with stop_signals(signals) as stop:
            await stop.wait()
        await self.stop()
