"""Shared fixtures: real rpcframe servers on 127.0.0.1 with port 0."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

import rpcframe
import rpcframe.aio
from tests.servicers import AioScriptedEcho, Backend, ScriptedEcho


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)


async def eventually(predicate: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Await ``predicate()`` until it is true; raise TimeoutError after ``within`` s."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 - polls remote state, no event to wait on
            await asyncio.sleep(0.005)


class Running:
    """A started server with its servicer and target."""

    def __init__(self, server: rpcframe.Server | rpcframe.aio.Server, servicer: object, port: int) -> None:
        self.server = server
        self.servicer = servicer
        self.target = f"127.0.0.1:{port}"


@pytest.fixture
def sync_server() -> Iterator[Running]:
    """A thread-pool rpcframe server serving the scripted echo servicer."""
    servicer = ScriptedEcho()
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=2.0))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    server.start()
    yield Running(server, servicer, port)
    servicer.release.set()
    server.stop(0)


@pytest.fixture
async def aio_server() -> AsyncIterator[Running]:
    """An asyncio rpcframe server serving the scripted echo servicer."""
    servicer = AioScriptedEcho()
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=2.0))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    await server.start()
    yield Running(server, servicer, port)
    servicer.release.set()
    await server.stop(0)


async def run_process(args: list[str]) -> tuple[int, str, str]:
    """Run a command without blocking the event loop (an asyncio server may be on it): code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def run_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a daemon thread; its result or exception lands in the list."""
    out: list[object] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    """Three thread-pool echo servers named a, b and c."""
    yield from _started("abc")


@pytest.fixture
def two() -> Iterator[list[Backend]]:
    """Two thread-pool echo servers named a and b."""
    yield from _started("ab")


def _started(names: str) -> Iterator[list[Backend]]:
    started = [Backend(name) for name in names]
    yield started
    for backend in started:
        backend.stop()
