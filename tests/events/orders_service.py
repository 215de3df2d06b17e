"""The order service of the events tests (needs the ``orders_gen`` fixture's package on sys.path).

Each method appends ``run <order_id>`` to the file named by ``ORDERS_LOG`` (if
set) when it starts; ``script`` scripts it: ``block-once`` blocks forever on
the first run of that order id (a worker to kill mid-call), ``fail:CODE:text``
ends with that status, ``abort:CODE:text`` aborts through the context.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
from evgen.acme.orders.v1 import orders_pb2 as pb  # type: ignore[import-not-found]
from evgen.acme.orders.v1 import orders_pb2_grpc  # type: ignore[import-not-found]

import rpcframe


def _log_run(order_id: str) -> bool:
    """Record a run; whether it is the first of this order id."""
    path = os.environ.get("ORDERS_LOG")
    if not path:
        return True
    first = not os.path.exists(path) or f"run {order_id}\n" not in open(path).read()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"run {order_id}\n".encode())
    os.close(fd)
    return first


async def _scripted(script: str, first: bool, context: Any) -> None:
    kind, _, rest = script.partition(":")
    if kind == "block-once" and first:
        await asyncio.Event().wait()
    if kind == "fail":
        code, _, text = rest.partition(":")
        raise rpcframe.errors.error_for(grpc.StatusCode[code], text)
    if kind == "abort":
        code, _, text = rest.partition(":")
        await context.abort(grpc.StatusCode[code], text)
    if kind == "crash":
        raise ZeroDivisionError("boom")


class AioOrders(orders_pb2_grpc.OrderServiceServicer):  # type: ignore[misc]
    """The asyncio servicer; counts runs per order id."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}

    async def PlaceOrder(self, request: Any, context: Any) -> Any:
        self.runs[request.order_id] = self.runs.get(request.order_id, 0) + 1
        await _scripted(request.script, _log_run(request.order_id), context)
        return pb.PlaceOrderResponse(order_id=request.order_id, status=f"placed {request.item}")

    async def GetOrder(self, request: Any, context: Any) -> Any:
        self.runs[request.order_id] = self.runs.get(request.order_id, 0) + 1
        await _scripted(request.script, _log_run(request.order_id), context)
        return pb.PlaceOrderResponse(order_id=request.order_id, status="found")


class SyncOrders(orders_pb2_grpc.OrderServiceServicer):  # type: ignore[misc]
    """A thread-pool servicer (runs in worker threads)."""

    def PlaceOrder(self, request: Any, context: Any) -> Any:
        if request.script.startswith("abort:"):
            _, code, text = request.script.split(":", 2)
            context.abort(grpc.StatusCode[code], text)
        return pb.PlaceOrderResponse(order_id=request.order_id, status=f"placed {request.item} (sync)")
