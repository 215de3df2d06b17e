"""Soak (reliability scenario 6): many unary calls against one server, its RSS, fds and threads sampled.

The client is asyncio for every server (rpcframe's channel for rpcframe's
servers, a raw grpc.aio channel for grpcio's), so the server is what limits
the rate. A warm-up comes first; samples are taken every ``total / samples``
calls, so a leak shows as growth from the first sample to the last.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import grpc.aio

import rpcframe
import rpcframe.aio
from benchmarks.reliability_load import run_aio
from benchmarks.reliability_procs import Stats, server_args, start_all, stats
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

IN_FLIGHT = 32
WARM_UP = 2000


async def _soak(stack: str, address: str, pid: int, total: int, samples: int) -> dict[str, Any]:
    if stack == "rpcframe":
        channel: Any = rpcframe.aio.connect(address, rpcframe.ChannelConfig())
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
    else:
        channel = grpc.aio.insecure_channel(address)
        stub = bench_pb2_grpc.BenchServiceStub(channel)
    request = bench_pb2.BenchRequest(response_size=64)
    every = max(1, total // samples)
    taken: list[Stats] = []
    counts = {"next": 0, "failed": 0}

    async def caller(limit: int, sample: bool) -> None:
        while counts["next"] < limit:
            counts["next"] += 1
            if sample and counts["next"] % every == 0 and (s := stats(pid)) is not None:
                taken.append(s)
            try:
                await stub.Unary(request, timeout=10)
            except grpc.RpcError:
                counts["failed"] += 1

    try:
        await asyncio.gather(*(caller(WARM_UP, False) for _ in range(IN_FLIGHT)))
        counts.update(next=0, failed=0)
        first = stats(pid)
        start = time.monotonic()
        await asyncio.gather(*(caller(total, True) for _ in range(IN_FLIGHT)))
        seconds = time.monotonic() - start
        last = stats(pid)
    finally:
        await channel.close()
    series = [s for s in (first, *taken, last) if s is not None]
    return {
        "calls": total, "failed": counts["failed"], "seconds": round(seconds, 1),
        "calls_per_s": round(total / seconds),
        "rss_mib": [round(s.rss_kib / 1024, 1) for s in series],
        "fds": [s.fds for s in series],
        "threads": [s.threads for s in series],
    }  # fmt: skip


def soak(stack: str, front: str, total: int, samples: int = 20) -> dict[str, Any]:
    """``total`` unary calls, :data:`IN_FLIGHT` at a time, against one fresh server of ``stack``/``front``."""
    backend = start_all([(server_args(stack, front), f"soak-{stack}-{front}", None)])[0]
    try:
        result: dict[str, Any] = run_aio(_soak(stack, backend.address, backend.pid, total, samples))
        result["alive"] = backend.alive()
        result["tracebacks"] = backend.tracebacks()
    finally:
        backend.stop()
    rss = result["rss_mib"]
    print(f"  soak    {stack:<8} {front:<4} {result['calls']} calls, {result['failed']} failed, "
          f"{result['calls_per_s']}/s, RSS {rss[0]} -> {rss[-1]} MiB", flush=True)  # fmt: skip
    return result
