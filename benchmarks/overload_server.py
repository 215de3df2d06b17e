"""A fixed-capacity server for the overload benchmark: ~2 ms of pure-Python CPU work per call.

::

    python -m benchmarks.overload_server --stack raw|rpcframe|rpcframe-off|rpcframe-queue --front sync|aio \\
        --iterations N --stats FILE

Serves ``rpcframe.bench.v1.BenchService/Unary`` on 127.0.0.1 port 0, prints
``serving on HOST:PORT`` once it accepts calls and stops on SIGTERM/SIGINT.
Each call runs a calibrated pure-Python loop of ``--iterations`` rounds
(:func:`calibrate` finds the count for a CPU time) on the handler's thread
(sync) or on the event loop (aio): the work holds the GIL, so one process
serves at most about one core's worth of calls, whatever its thread count.

Per call the handler measures its own CPU time (``time.thread_time()``) and
whether the call's deadline had passed when the work ended
(``context.time_remaining() <= 0``). Totals are kept per *step*, the tag the
load generator puts in the request's ``count`` field (unused by Unary), so
each step of a load run is charged exactly the calls it sent. The totals go
to ``--stats`` as JSON every second and once more at exit.

Stacks: ``raw`` is grpcio alone as its users write it (a thread pool of
``RAW_WORKERS``, the size of ``ServerConfig``'s default pool; grpc.aio on the
default asyncio loop); ``rpcframe`` is ``rpcframe.Server``/``rpcframe.aio.Server``
with default settings (on uvloop, rpcframe's default loop); ``rpcframe-off``
the same with ``ServerConfig(overload=None)``, when the field exists;
``rpcframe-queue`` the defaults plus ``OverloadConfig(accept_queue=16)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

STACKS = ("raw", "rpcframe-off", "rpcframe", "rpcframe-queue")
#: ``OverloadConfig.accept_queue`` of the ``rpcframe-queue`` stack: ~500 calls/s x 30 ms of queueing.
ACCEPT_QUEUE = 16
FRONTS = ("sync", "aio")
#: Thread-pool size of the raw sync server: ``ServerConfig().max_workers``, so pool size is not the difference.
RAW_WORKERS = 64
#: Steps a load run may tag (request ``count`` values); larger tags are charged to the last slot.
MAX_STEPS = 32
STATS_EVERY = 1.0
GRACE = 2.0
_EMPTY = bench_pb2.BenchResponse()


def spin(iterations: int) -> int:
    """The handler's work: a pure-Python loop that holds the GIL throughout."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def calibrate(seconds: float, rounds: int = 15) -> int:
    """Iterations of :func:`spin` that take ``seconds`` of CPU on this thread (median of ``rounds`` samples)."""
    probe = 20_000
    spin(probe)  # warm up the loop once
    rates = []
    for _ in range(rounds):
        t0 = time.thread_time()
        spin(probe)
        rates.append(probe / max(time.thread_time() - t0, 1e-6))
    return max(1, round(statistics.median(rates) * seconds))


class Ledger:
    """Per-step totals of handler work: calls, CPU, and those that finished past their deadline."""

    FIELDS = ("calls", "cpu_s", "missed_calls", "missed_cpu_s", "expired_at_start")

    def __init__(self) -> None:
        self._rows = [[0, 0.0, 0, 0.0, 0] for _ in range(MAX_STEPS)]
        self._lock = threading.Lock()  # sync handlers run on many threads; uncontended it costs ~0.1 µs

    def add(self, step: int, cpu: float, missed: bool, expired_at_start: bool) -> None:
        """Charge one call to ``step``."""
        with self._lock:
            row = self._rows[min(step, MAX_STEPS - 1)]
            row[0] += 1
            row[1] += cpu
            if missed:
                row[2] += 1
                row[3] += cpu
            if expired_at_start:
                row[4] += 1

    def write(self, path: Path) -> None:
        """Replace ``path`` with the totals (steps that saw calls only), atomically."""
        with self._lock:
            rows = {str(i): dict(zip(self.FIELDS, row, strict=True)) for i, row in enumerate(self._rows) if row[0]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows), encoding="utf-8")
        os.replace(tmp, path)


def _expired(context: Any) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class CpuServicer(bench_pb2_grpc.BenchServiceServicer):
    """Thread-pool Unary: ``iterations`` of :func:`spin`, charged to the request's step."""

    def __init__(self, iterations: int, ledger: Ledger) -> None:
        self.iterations = iterations
        self.ledger = ledger

    def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        """Do the work; record its CPU and whether the deadline passed before it ended."""
        late = _expired(context)
        t0 = time.thread_time()
        spin(self.iterations)
        cpu = time.thread_time() - t0
        self.ledger.add(request.count, cpu, late or _expired(context), late)
        return _EMPTY


class AioCpuServicer(bench_pb2_grpc.BenchServiceServicer):
    """asyncio Unary: the same work, run on the event loop (a CPU-bound ``async def`` handler)."""

    def __init__(self, iterations: int, ledger: Ledger) -> None:
        self.iterations = iterations
        self.ledger = ledger

    async def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        """Do the work; record its CPU and whether the deadline passed before it ended."""
        late = _expired(context)
        t0 = time.thread_time()
        spin(self.iterations)
        cpu = time.thread_time() - t0
        self.ledger.add(request.count, cpu, late or _expired(context), late)
        return _EMPTY


# -- stacks ---------------------------------------------------------------------------


def overload_supported() -> bool:
    """Whether this rpcframe has ``ServerConfig.overload`` (so ``rpcframe-off`` differs from ``rpcframe``)."""
    import rpcframe

    return "overload" in rpcframe.ServerConfig.__dataclass_fields__


def rpcframe_config(stack: str, accept_queue: int = ACCEPT_QUEUE) -> Any:
    """``ServerConfig`` of an rpcframe stack: defaults, a short grace; no protection for ``rpcframe-off``,
    a short accept queue for ``rpcframe-queue``."""
    import rpcframe

    extra: dict[str, Any] = {}
    if stack == "rpcframe-off" and overload_supported():
        extra["overload"] = None
    elif stack == "rpcframe-queue":
        extra["overload"] = rpcframe.OverloadConfig(accept_queue=accept_queue)
    return rpcframe.ServerConfig(grace_period=GRACE, **extra)


def _announce(port: int) -> None:
    print(f"serving on 127.0.0.1:{port}", flush=True)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    while not stop.wait(0.5):  # a timed wait stays interruptible by signals
        pass


def serve_sync(stack: str, servicer: CpuServicer, accept_queue: int = ACCEPT_QUEUE) -> None:
    """The thread-pool server of ``stack`` until SIGTERM/SIGINT."""
    if stack == "raw":
        server = grpc.server(ThreadPoolExecutor(max_workers=RAW_WORKERS))
        bench_pb2_grpc.add_BenchServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        _announce(port)
        _wait_for_signal()
        server.stop(GRACE).wait()
        return
    import rpcframe

    rf = rpcframe.Server(rpcframe_config(stack, accept_queue))
    rf.add(servicer)
    port = rf.bind("127.0.0.1:0")
    rf.run(on_ready=lambda: _announce(port))


async def serve_aio(stack: str, servicer: AioCpuServicer, accept_queue: int = ACCEPT_QUEUE) -> None:
    """The asyncio server of ``stack`` until SIGTERM/SIGINT."""
    if stack == "raw":
        server = grpc.aio.server()
        bench_pb2_grpc.add_BenchServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        _announce(port)
        await stop.wait()
        await server.stop(GRACE)
        return
    import rpcframe.aio

    rf = rpcframe.aio.Server(rpcframe_config(stack, accept_queue))
    rf.add(servicer)
    port = rf.bind("127.0.0.1:0")
    await rf.run(on_ready=lambda: _announce(port))


def _stats_writer(ledger: Ledger, path: Path) -> Callable[[], None]:
    """Write the ledger every ``STATS_EVERY`` s on a daemon thread; returns the function that stops it."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(STATS_EVERY):
            ledger.write(path)

    thread = threading.Thread(target=loop, name="overload-stats", daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(5)
        ledger.write(path)

    return stop


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then write the final per-step totals."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload_server", description=__doc__.split("\n")[0])
    parser.add_argument("--stack", choices=STACKS, required=True)
    parser.add_argument("--front", choices=FRONTS, required=True)
    parser.add_argument("--iterations", type=int, required=True, help="spin() rounds per call (see calibrate)")
    parser.add_argument("--stats", type=Path, required=True, help="JSON file the per-step totals go to")
    parser.add_argument("--accept-queue", type=int, default=ACCEPT_QUEUE, help="the rpcframe-queue stack's queue")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    ledger = Ledger()
    stop_stats = _stats_writer(ledger, args.stats)
    try:
        if args.front == "sync":
            serve_sync(args.stack, CpuServicer(args.iterations, ledger), args.accept_queue)  # type: ignore[abstract]
        elif args.stack == "raw":
            asyncio.run(serve_aio(args.stack, AioCpuServicer(args.iterations, ledger), args.accept_queue))  # type: ignore[abstract]
        else:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(serve_aio(args.stack, AioCpuServicer(args.iterations, ledger), args.accept_queue))  # type: ignore[abstract]
    finally:
        stop_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
