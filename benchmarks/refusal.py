"""What refusing a call costs a server: in Python (rpcframe's admission path) and in grpc's core.

::

    python -m benchmarks.refusal [--quick] [--rounds 5] [--calls 20000]

Overload protection refuses calls so that the CPU goes to calls that can
still finish in time; it only works if refusing is much cheaper than
running. This measures the server CPU one call costs (user + system time of
the server process's threads from /proc, divided by the calls sent; a raw
grpc.aio client in another process keeps 64 calls in flight over 8
connections), in total and in the threads that run Python, in five modes,
interleaved round by round, each in a fresh server process:

- ``raw echo`` / ``rpcframe echo``: an empty handler answering OK (grpcio
  alone; rpcframe with default settings).
- ``rpcframe refused``: rpcframe with a rate limit no call fits, so every
  call is refused unrun with RESOURCE_EXHAUSTED before its handler, by the
  same code path admission control refuses with.
- ``core refused`` (asyncio front only): grpc's core refuses the call
  itself, as with ``OverloadConfig.accept_queue``: a server-streaming call
  holds the server's one call slot and its pending queue is full, so almost
  no Python runs per call (grpc.aio's own limiter answers some with
  RESOURCE_EXHAUSTED).

From these it works out the most goodput an admission control can keep at
A x capacity for the overload benchmark's handler (``--handler-ms`` of CPU
per call): with ``h`` the Python-thread cost of an admitted call (handler +
echo) and ``r`` that of a refused one, G*h + (A*C - G)*r <= 1 s per second
gives G/C <= (1 - A*r/h) / (1 - r/h). Only Python-thread time counts: it
holds the GIL, as the handler does, while grpc's C threads run beside it on
the other core. Results go to ``benchmarks/results/refusal.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

from ._children import ChildServers

MODES = ("raw echo", "rpcframe echo", "rpcframe refused", "core refused")
FRONTS = ("sync", "aio")
IN_FLIGHT, CONNECTIONS = 64, 8
_TICKS = os.sysconf("SC_CLK_TCK")
_EMPTY = bench_pb2.BenchResponse()


# -- the server (child process) ----------------------------------------------------


class _Echo(bench_pb2_grpc.BenchServiceServicer):
    def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        return _EMPTY


class _AioEcho(bench_pb2_grpc.BenchServiceServicer):
    def __init__(self) -> None:
        self.parked = asyncio.Event()

    async def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        return _EMPTY

    async def ServerStream(self, request: bench_pb2.BenchRequest, context: Any) -> AsyncIterator[Any]:
        yield _EMPTY  # tells the client the call holds the slot
        await self.parked.wait()


def _rpcframe_config(mode: str) -> Any:
    import rpcframe

    limits = (rpcframe.RateLimit(rate=1e-6, burst=1),) if mode == "rpcframe refused" else ()
    return rpcframe.ServerConfig(reflection=False, grace_period=0, rate_limits=limits)


def _serve_sync(mode: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    if mode == "raw echo":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken by sigwait below, not fatal
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        bench_pb2_grpc.add_BenchServiceServicer_to_server(_Echo(), server)  # type: ignore[abstract]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(f"serving on 127.0.0.1:{port}", flush=True)
        signal.sigwait({signal.SIGTERM})
        server.stop(0)
        return
    import rpcframe

    rf = rpcframe.Server(_rpcframe_config(mode))
    rf.add(_Echo())  # type: ignore[abstract]
    port = rf.bind("127.0.0.1:0")
    rf.run(on_ready=lambda: print(f"serving on 127.0.0.1:{port}", flush=True))


async def _serve_aio(mode: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    servicer = _AioEcho()  # type: ignore[abstract]
    if mode in ("raw echo", "core refused"):
        # "core refused": one call at a time and no pending queue: while the
        # parked call holds the slot, grpc's core refuses every other call.
        limits = {
            "maximum_concurrent_rpcs": 1,
            "options": [("grpc.server.max_pending_requests", 1), ("grpc.server.max_pending_requests_hard_limit", 1)],
        }
        server = grpc.aio.server(**(limits if mode == "core refused" else {}))
        bench_pb2_grpc.add_BenchServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"serving on 127.0.0.1:{port}", flush=True)
        await stop.wait()
        servicer.parked.set()
        await server.stop(0)
        return
    import rpcframe.aio

    rf = rpcframe.aio.Server(_rpcframe_config(mode))
    rf.add(servicer)
    rf_port = rf.bind("127.0.0.1:0")
    await rf.start()
    print(f"serving on 127.0.0.1:{rf_port}", flush=True)
    await stop.wait()
    await rf.stop(0)


# -- the load (parent) -------------------------------------------------------------


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of the process so far: (all threads, the threads that run Python).

    Threads that run Python keep the main thread's name; grpc names its own
    C threads ("event_engine", "grpc_global_tim", ...). Python work holds the
    GIL, so it is the part that competes with a CPU-bound handler. A thread
    that ended is not counted (none ends while the benchmark reads).
    """
    main = Path(f"/proc/{pid}/comm").read_text()
    total = python = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
        total += seconds
        if name == main:
            python += seconds
    return total, python


async def _run(address: str, calls: int, pid: int, park: bool) -> dict[str, Any]:
    """Warm up, then send ``calls`` calls, IN_FLIGHT at a time, reading the server's CPU around them."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(CONNECTIONS)]
    unary = [channel.unary_unary("/rpcframe.bench.v1.BenchService/Unary") for channel in channels]
    request = bench_pb2.BenchRequest().SerializeToString()
    parked = None
    if park:
        stream = channels[0].unary_stream("/rpcframe.bench.v1.BenchService/ServerStream")
        parked = stream(request, timeout=600)
    codes: dict[str, int] = {}
    left = 0

    async def worker(index: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                await unary[index % CONNECTIONS](request, timeout=2)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

    try:
        if parked is not None:
            await asyncio.wait_for(parked.read(), 10)  # its handler holds the slot
        left = 500  # warm-up
        await asyncio.gather(*(worker(i) for i in range(IN_FLIGHT)))
        if parked is not None and parked.done():
            raise RuntimeError("the parked call ended: grpc refused it; the core-refused figures would be wrong")
        codes.clear()
        left = calls
        before, start = _cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(IN_FLIGHT)))
        elapsed, after = time.perf_counter() - start, _cpu_seconds(pid)
    finally:
        if parked is not None:
            parked.cancel()
        for channel in channels:
            await channel.close()
    return {
        "us_per_call": (after[0] - before[0]) / calls * 1e6,
        "python_us_per_call": (after[1] - before[1]) / calls * 1e6,
        "qps": calls / elapsed,
        "codes": codes,
    }


def measure(front: str, mode: str, calls: int) -> dict[str, Any]:
    """One round of one mode in a fresh server process: server CPU per call (µs), calls/s, statuses."""
    servers = ChildServers(["-m", "benchmarks.refusal", "--serve", mode, "--front", front], 1)
    try:
        return asyncio.run(_run(servers.addresses[0], calls, servers.proc.pid, mode == "core refused"))
    finally:
        servers.stop()


def ceiling(load: float, admitted_us: float, refused_us: float) -> float:
    """The goodput share of capacity an admission refusing at ``refused_us`` keeps at ``load`` x capacity."""
    ratio = refused_us / admitted_us
    return max(0.0, min(1.0, (1 - load * ratio) / (1 - ratio)))


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, print and write the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refusal", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5000 calls")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--handler-ms", type=float, default=2.0, help="CPU of the overload benchmark's handler")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--front", choices=FRONTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        if args.front == "sync":
            _serve_sync(args.serve)
        else:
            import uvloop

            loop_factory = None if args.serve in ("raw echo", "core refused") else uvloop.new_event_loop
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(_serve_aio(args.serve))
        return 0
    rounds, calls = (2, 5000) if args.quick else (args.rounds, args.calls)
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for index in range(rounds):
        for front in FRONTS:
            for mode in MODES:
                if mode == "core refused" and front == "sync":
                    continue
                result = measure(front, mode, calls)
                samples.setdefault((front, mode), []).append(result)
                print(f"round {index + 1} {front:4} {mode:17} {result['us_per_call']:6.1f} µs/call "
                      f"(Python {result['python_us_per_call']:6.1f}) "
                      f"{result['qps']:7.0f} calls/s {result['codes']}", flush=True)  # fmt: skip
    report = _report(samples, rounds, calls, args.handler_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "refusal.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


def _report(samples: dict[tuple[str, str], list[dict[str, Any]]], rounds: int, calls: int, handler_ms: float) -> str:
    def cost(key: tuple[str, str], field: str = "us_per_call") -> tuple[float, float, float]:
        values = [s[field] for s in samples[key]]
        return statistics.median(values), min(values), max(values)

    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [
        "# What refusing a call costs the server",
        "",
        f"Run {when}: {rounds} rounds of {calls} calls per mode, interleaved; {os.cpu_count()} CPUs, "
        f"grpcio {grpc.__version__}; `python -m benchmarks.refusal` (module docstring: method and model). "
        f"Server CPU per call from /proc, median (min-max): all threads, and the threads that run Python "
        f"(those hold the GIL, so they compete with a CPU-bound handler). A raw grpc.aio client keeps "
        f"{IN_FLIGHT} calls in flight over {CONNECTIONS} connections.",
        "",
        "| front | mode | server CPU µs/call | of it in Python threads | calls/s (median) | statuses (last round) |",
        "|---|---|---|---|---|---|",
    ]
    for (front, mode), rows in samples.items():
        med, low, high = cost((front, mode))
        py, py_low, py_high = cost((front, mode), "python_us_per_call")
        qps = statistics.median(s["qps"] for s in rows)
        lines.append(
            f"| {front} | {mode} | {med:.0f} ({low:.0f}-{high:.0f}) | {py:.0f} ({py_low:.0f}-{py_high:.0f}) "
            f"| {qps:.0f} | {rows[-1]['codes']} |"
        )
    lines += [
        "",
        f"Most goodput (share of capacity) an admission control can keep at 3× and 5× offered load when each "
        f"admitted call costs a {handler_ms:g} ms handler plus the echo's Python-thread time and each refused "
        "one the refusal's Python-thread time (G·h + (A·C − G)·r ≤ 1; grpc's C threads run beside the GIL "
        "on the other core and are left out):",
        "",
        "| front | refused by | refusal / admitted call | at 3× | at 5× |",
        "|---|---|---|---|---|",
    ]
    for front in FRONTS:
        admitted = handler_ms * 1000 + cost((front, "rpcframe echo"), "python_us_per_call")[0]
        for mode, label in (("rpcframe refused", "rpcframe (Python)"), ("core refused", "grpc core")):
            if (front, mode) in samples:
                refused = cost((front, mode), "python_us_per_call")[0]
                at3, at5 = ceiling(3, admitted, refused), ceiling(5, admitted, refused)
                lines.append(f"| {front} | {label} | {refused / admitted:.1%} | {at3:.0%} | {at5:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
