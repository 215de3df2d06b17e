"""Event loop choice: uvloop when installed (faster grpc.aio), asyncio otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["STOP_SIGNALS", "run", "stop_signals", "uvloop_available"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def uvloop_available() -> bool:
    """Whether uvloop can be imported here."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion on a new loop (uvloop unless disabled or missing)."""
    if use_uvloop and uvloop_available():
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


@contextlib.asynccontextmanager
async def stop_signals(signals: Sequence[int] = STOP_SIGNALS) -> AsyncIterator[asyncio.Event]:
    """An event set by any of ``signals`` while the block runs; the previous handling returns after it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
