"""Asynchronous calls of a unary method through a real nats-server: receipt, work queue, typed result."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import rpcframe
from rpcframe.events import DEAD_REASON, AsyncCalls, AsyncMethod, Events, Worker
from rpcframe.events._calls import call_dead_letters
from tests.events.natsserver import NatsServer

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "acme.orders.v1.OrderService"


@pytest.fixture
def orders(orders_gen: Path) -> Any:
    """The generated order-service messages module."""
    from evgen.acme.orders.v1 import orders_pb2  # type: ignore[import-not-found]

    return orders_pb2


def place(pb: Any) -> AsyncMethod[Any, Any]:
    return AsyncMethod(SERVICE, "PlaceOrder", pb.PlaceOrderRequest, pb.PlaceOrderResponse)


def get(pb: Any) -> AsyncMethod[Any, Any]:
    return AsyncMethod(SERVICE, "GetOrder", pb.GetOrderRequest, pb.PlaceOrderResponse)


async def test_call_is_queued_without_a_worker_then_handled_and_typed(own_nats: NatsServer, orders: Any) -> None:
    from tests.events.orders_service import AioOrders

    events = await Events.connect(own_nats.url)
    calls = AsyncCalls(events)
    try:
        receipt = await calls.submit(place(orders), orders.PlaceOrderRequest(order_id="o-1", item="book"))
        again = await calls.submit(
            place(orders), orders.PlaceOrderRequest(order_id="o-1", item="book"), receipt=receipt.id
        )
        assert await calls.lookup(receipt) is None  # queued: no worker runs yet
        servicer = AioOrders()
        async with Worker(events, servicer):
            response = await calls.result(receipt, within=10)
        assert isinstance(response, orders.PlaceOrderResponse)
        assert (response.order_id, response.status) == ("o-1", "placed book")
        assert again.id == receipt.id
        assert servicer.runs == {"o-1": 1}  # the same receipt submitted twice was queued once
        stored = await calls.lookup(receipt)
        assert stored == response  # fetched by receipt, later
    finally:
        await events.close()


async def test_error_statuses_come_back_as_rpcframe_errors(events: Events, orders: Any) -> None:
    from tests.events.orders_service import AioOrders, SyncOrders

    calls = AsyncCalls(events)
    req = orders.PlaceOrderRequest
    async with Worker(events, AioOrders()):
        failing = await calls.submit(place(orders), req(order_id="e-1", script="fail:NOT_FOUND:no such item"))
        aborted = await calls.submit(place(orders), req(order_id="e-2", script="abort:FAILED_PRECONDITION:closed"))
        crashed = await calls.submit(place(orders), req(order_id="e-3", script="crash"))
        with pytest.raises(rpcframe.NotFound, match="no such item"):
            await calls.result(failing, within=10)
        with pytest.raises(rpcframe.FailedPrecondition, match="closed"):
            await calls.result(aborted, within=10)
        with pytest.raises(rpcframe.Internal, match=r"internal error \(ref "):
            await calls.result(crashed, within=10)
    # A thread-pool servicer (sync context.abort) serves the same queue.
    async with Worker(events, SyncOrders()):
        ok = await calls.submit(place(orders), req(order_id="s-1", item="pen"))
        bad = await calls.submit(place(orders), req(order_id="s-2", script="abort:OUT_OF_RANGE:too many"))
        assert (await calls.result(ok, within=10)).status == "placed pen (sync)"
        with pytest.raises(rpcframe.OutOfRange, match="too many"):
            await calls.result(bad, within=10)


async def test_wrong_request_type_and_streaming_methods_are_refused(orders_gen: Path, events: Events) -> None:
    from evgen.acme.orders.v1 import orders_pb2 as pb  # type: ignore[import-not-found]

    with pytest.raises(TypeError, match="takes PlaceOrderRequest, not GetOrderRequest"):
        await AsyncCalls(events).submit(place(pb), pb.GetOrderRequest(order_id="x"))
    with pytest.raises(rpcframe.ConfigError, match="streams: only unary methods"):
        AsyncMethod(SERVICE, "WatchOrders", pb.GetOrderRequest, pb.PlaceOrderResponse)
    with pytest.raises(rpcframe.ConfigError, match="no method acme.orders.v1.OrderService.Nope"):
        AsyncMethod(SERVICE, "Nope", pb.GetOrderRequest, pb.PlaceOrderResponse)


class WorkerProcess:
    """tests/events/worker_proc.py, stopped by PID."""

    def __init__(self, url: str, gen: Path, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{gen}", "ORDERS_LOG": str(log)}
        args = [sys.executable, "-m", "tests.events.worker_proc", url, "1.0"]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "ready\n", f"worker did not start: {line!r}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


async def _killed_mid_call(url: str, gen: Path, tmp_path: Path, method: AsyncMethod[Any, Any], request: Any) -> Any:
    """Submit, let a worker process start the call, kill -9 it, start another: the call's outcome."""
    log = tmp_path / "runs.log"
    events = await Events.connect(url)
    calls = AsyncCalls(events)
    workers = [WorkerProcess(url, gen, log)]
    try:
        receipt = await calls.submit(method, request)
        await _eventually_file(log, "run ")
        workers[0].kill()  # mid-call: the handler is blocked
        workers.append(WorkerProcess(url, gen, log))
        try:
            return await calls.result(receipt, within=15), log.read_text().count("run ")
        except rpcframe.RpcError as exc:
            dead = await events.broker.last(call_dead_letters(SERVICE).name, f"dlq.rpc.{SERVICE}")
            return (exc, dead), log.read_text().count("run ")
    finally:
        for worker in workers:
            worker.kill()
        await events.close()


async def _eventually_file(path: Path, text: str) -> None:
    from tests.conftest import eventually

    def read() -> str:
        return path.read_text() if path.exists() else ""

    async def there() -> bool:
        return text in await asyncio.to_thread(read)

    await eventually(there, within=10)


async def test_worker_killed_mid_call_non_idempotent_is_dead_lettered_never_run_twice(
    own_nats: NatsServer, orders_gen: Path, orders: Any, tmp_path: Path
) -> None:
    request = orders.PlaceOrderRequest(order_id="k-1", item="lamp", script="block-once")
    (error, dead), runs = await _killed_mid_call(own_nats.url, orders_gen, tmp_path, place(orders), request)
    assert runs == 1  # never run twice
    assert isinstance(error, rpcframe.Unknown)
    assert "PlaceOrder is not idempotent: not run again" in error.details()
    assert dead is not None
    assert dead.headers[DEAD_REASON] == error.details()
    assert orders.PlaceOrderRequest.FromString(dead.data) == request


async def test_worker_killed_mid_call_idempotent_is_redelivered_and_answered(
    own_nats: NatsServer, orders_gen: Path, orders: Any, tmp_path: Path
) -> None:
    request = orders.GetOrderRequest(order_id="k-2", script="block-once")
    response, runs = await _killed_mid_call(own_nats.url, orders_gen, tmp_path, get(orders), request)
    assert runs == 2  # run again by the second worker
    assert (response.order_id, response.status) == ("k-2", "found")
