"""Serving on every core: ``rpcframe serve --workers N``, measured (results in benchmarks/results/workers.md).

Every server is a child process on 127.0.0.1 (``rpcframe serve``, or
``examples.bench_server --raw`` for grpcio alone), stopped by PID; the
client is this process: one rpcframe asyncio channel on uvloop, closed loop.

1. **CPU-bound handler** (pure Python, ~2 ms per call, calibrated here):
   ``--workers 2`` vs ``--workers 1`` on the thread-pool and the asyncio
   server, 8 calls in flight over 8 connections
   (``ChannelConfig.connections_per_endpoint``), and over 1. The goal is
   1.7x the QPS on a 2-core machine whose cores the client needs too.
2. **Echo, 64 B unary**, 16 in flight: rpcframe ``--workers 1`` and ``2``
   and a raw grpcio server (one process: grpcio has no multi-process
   server), each from a client with 1 connection and with 8.
3. **Rolling restart**: SIGHUP to ``--workers 2`` (defaults, and without
   admission control) under 16 in-flight non-idempotent calls (Record,
   2 ms) from a client with 8 connections: failed calls, executions of one
   request more than once (the servers log every execution), p50/p99
   before and during the restart.

Throughput runs turn overload protection off (``--no-overload-protection``):
a saturated server is the point of them, not one to shed load from.
Configurations alternate within each round; figures are medians over the
rounds with [min-max]. The machine is shared: read the spread.

    python -m benchmarks.workers [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from examples.bench_server import BenchServicer
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "workers.md"
CPU_MS = 2.0  # target pure-Python work per CPU-bound call
CPU_IN_FLIGHT = 8
ECHO_IN_FLIGHT = 16
RESTART_IN_FLIGHT = 16
CONNECTIONS = 8
_TICK = os.sysconf("SC_CLK_TCK")


# -- the CPU-bound servicer (served by the workers: `rpcframe serve benchmarks.workers:cpu_servicer`) --


def burn(iterations: int) -> int:
    """Pure-Python work that holds the GIL: ``iterations`` multiply-adds."""
    total = 0
    for i in range(iterations):
        total += i * i
    return total


class CpuBench(BenchServicer):
    """BenchService whose Unary burns ``request.count`` iterations of :func:`burn`, then answers as echo.

    The answer carries ``response_size`` bytes, the worker's process id and
    (in ``count``) the CPU time the burn took in this process, in µs.
    """

    def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        """Burn, then answer with the process id."""
        return _burned(request, self.server_id)


class AioCpuBench(bench_pb2_grpc.BenchServiceServicer):
    """:class:`CpuBench` on the asyncio server (the burn holds the event loop, as CPU-bound work does)."""

    def __init__(self) -> None:
        self.server_id = str(os.getpid())

    async def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:  # type: ignore[override]
        """Burn, then answer with the process id."""
        return _burned(request, self.server_id)


def _burned(request: bench_pb2.BenchRequest, server_id: str) -> bench_pb2.BenchResponse:
    started = time.thread_time()
    burn(request.count)
    used = int((time.thread_time() - started) * 1e6)
    return bench_pb2.BenchResponse(payload=bytes(request.response_size), server_id=server_id, count=used)


def cpu_servicer() -> CpuBench:
    """Factory for ``rpcframe serve``: made in each worker, after the fork."""
    return CpuBench(server_id=str(os.getpid()))


def aio_cpu_servicer() -> AioCpuBench:
    """asyncio factory for ``rpcframe serve``."""
    return AioCpuBench()


def calibrate(target_ms: float = CPU_MS) -> tuple[int, float]:
    """Iterations of :func:`burn` that take ``target_ms`` here (best of 5), and the ms they took."""
    probe = 200_000
    best = min(_timed(probe) for _ in range(5))
    iterations = int(probe * target_ms / 1000 / best)
    return iterations, min(_timed(iterations) for _ in range(5)) * 1000


def _timed(iterations: int) -> float:
    started = time.perf_counter()
    burn(iterations)
    return time.perf_counter() - started


# -- servers ------------------------------------------------------------------------------------


class Server:
    """A server process: ``rpcframe serve TARGET --workers N`` or raw grpcio; its stderr kept in memory."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.lines: list[str] = []
        stderr = self.proc.stderr
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(stderr.readline, "")), daemon=True)
        self._reader.start()
        ready = self.proc.stdout.readline()
        if not ready.startswith("serving on "):
            self.stop()
            raise RuntimeError(f"server {' '.join(args)} did not start: {''.join(self.lines)[-2000:]}")
        self.target = ready.split()[-1]

    @classmethod
    def rpcframe(cls, target: str, workers: int, *extra: str, env: dict[str, str] | None = None) -> Server:
        """``rpcframe serve TARGET --workers N`` on a free port."""
        return cls(["-m", "rpcframe", "serve", target, "--bind", "127.0.0.1:0", "--workers", str(workers),
                    "--grace", "5", *extra], env)  # fmt: skip

    @classmethod
    def raw(cls) -> Server:
        """A grpcio thread-pool server alone (64 threads, as rpcframe's default pool)."""
        return cls(["-m", "examples.bench_server", "--raw", "--sync", "--bind", "127.0.0.1:0", "--workers", "64"])

    def pids(self) -> list[int]:
        """The serving processes: the workers, or the process itself when it has none."""
        children = [pid for pid, ppid in _processes() if ppid == self.proc.pid]
        return children or [self.proc.pid]

    def stderr(self) -> str:
        """What the server wrote to stderr so far."""
        return "".join(self.lines)

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL after 15 s), then close the pipes."""
        workers = [pid for pid, ppid in _processes() if ppid == self.proc.pid]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in workers:  # gone already unless the supervisor was killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _processes() -> list[tuple[int, int]]:
    """(pid, parent pid) of every live process, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z":
                found.append((int(entry), int(fields[1])))
    return found


def _cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / _TICK


# -- load -----------------------------------------------------------------------------------------


@dataclass
class Run:
    """One closed-loop run against one server."""

    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    client_cores: float = 0.0
    server_cores: float = 0.0
    pids: set[str] = field(default_factory=set)
    handler_us: list[int] = field(default_factory=list)  # CPU time of the work itself, as the handler measured it

    @property
    def qps(self) -> float:
        """Calls answered per second."""
        return self.calls / self.seconds if self.seconds else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(server: Server, request: bench_pb2.BenchRequest, *, connections: int, in_flight: int,
                      seconds: float, warmup: float = 0.5) -> Run:  # fmt: skip
    """``in_flight`` callers calling Unary back to back for ``seconds`` (after ``warmup``)."""
    import rpcframe
    import rpcframe.aio

    config = rpcframe.ChannelConfig(connections_per_endpoint=connections, default_timeout=10)
    run = Run()
    async with rpcframe.aio.connect(server.target, config) as channel:
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        await _all_ready(channel, connections)
        measuring = False
        stop_at = time.monotonic() + warmup + seconds

        async def caller() -> None:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = await stub.Unary(request)
                except grpc.RpcError as exc:
                    run.failed[exc.code().name] += 1
                    continue
                if measuring:
                    run.latencies.append(time.perf_counter() - started)
                    run.pids.add(response.server_id)
                    run.handler_us.append(response.count)

        tasks = [asyncio.ensure_future(caller()) for _ in range(in_flight)]
        await asyncio.sleep(warmup)
        measuring = True
        pids = server.pids()
        wall, client_cpu, server_cpu = time.monotonic(), time.process_time(), _cpu_seconds(pids)
        await asyncio.gather(*tasks)
        run.seconds = time.monotonic() - wall
        run.client_cores = (time.process_time() - client_cpu) / run.seconds
        run.server_cores = (_cpu_seconds(pids) - server_cpu) / run.seconds
        run.calls = len(run.latencies)
    return run


async def _all_ready(channel: Any, connections: int) -> None:
    """Until every connection of the channel is up (bounded: 10 s)."""
    until = time.monotonic() + 10
    while [state for _, state in channel.endpoints()] != ["READY"] * connections:
        if time.monotonic() > until:
            raise RuntimeError(f"connections not ready: {channel.endpoints()}")
        await asyncio.sleep(0.01)


# -- scenarios ------------------------------------------------------------------------------------


def _spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


#: (server front, workers, client connections)
CPU_CASES = (("sync", 1, CONNECTIONS), ("sync", 2, CONNECTIONS), ("sync", 2, 1), ("aio", 1, CONNECTIONS),
             ("aio", 2, CONNECTIONS))  # fmt: skip
TARGETS = {"sync": "benchmarks.workers:cpu_servicer", "aio": "benchmarks.workers:aio_cpu_servicer"}


async def cpu_bound(rounds: int, seconds: float, iterations: int) -> dict[tuple[str, int, int], list[Run]]:
    """CPU-bound handler: --workers 1 and 2 on each server front, alternating; one client process."""
    request = bench_pb2.BenchRequest(count=iterations)
    runs: dict[tuple[str, int, int], list[Run]] = collections.defaultdict(list)
    for n in range(rounds):
        for case in CPU_CASES if n % 2 == 0 else CPU_CASES[::-1]:
            front, workers, connections = case
            server = Server.rpcframe(TARGETS[front], workers, "--no-overload-protection", "--log-level", "WARNING")
            try:
                run = await closed_loop(server, request, connections=connections, in_flight=CPU_IN_FLIGHT,
                                        seconds=seconds)  # fmt: skip
            finally:
                server.stop()
            runs[case].append(run)
            print(f"  cpu round {n + 1} {front} --workers {workers}, {connections} connections: {run.qps:.0f} "
                  "calls/s", flush=True)  # fmt: skip
    return runs


ECHO_CASES = (("rpcframe --workers 1", 1), ("rpcframe --workers 2", 2), ("raw grpcio (1 process)", 0))


async def echo(rounds: int, seconds: float) -> dict[tuple[str, int], list[Run]]:
    """Echo 64 B: each server with a 1-connection and an 8-connection client."""
    request = bench_pb2.BenchRequest(payload=bytes(64), response_size=64)
    runs: dict[tuple[str, int], list[Run]] = collections.defaultdict(list)
    for n in range(rounds):
        cases = ECHO_CASES if n % 2 == 0 else ECHO_CASES[::-1]
        for name, workers in cases:
            server = (
                Server.raw() if workers == 0 else
                Server.rpcframe(TARGETS["sync"], workers, "--no-overload-protection", "--log-level", "WARNING")
            )  # fmt: skip
            try:
                for connections in (1, CONNECTIONS) if n % 2 == 0 else (CONNECTIONS, 1):
                    run = await closed_loop(server, request, connections=connections, in_flight=ECHO_IN_FLIGHT,
                                            seconds=seconds)  # fmt: skip
                    runs[name, connections].append(run)
            finally:
                server.stop()
        print(f"  echo round {n + 1} done", flush=True)
    return runs


@dataclass
class Restart:
    """One rolling restart under load."""

    calls: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicated: int = 0
    unanswered: int = 0  # executed, but the caller saw no answer (must be 0: every caller waits for its call)
    before: list[float] = field(default_factory=list)
    during: list[float] = field(default_factory=list)
    restart_s: float = 0.0
    replaced: bool = False
    settings: str = "defaults"


#: Server settings of the rolling restart: rpcframe's defaults, and without admission control (which on a
#: saturated machine refuses some calls whether or not a restart is under way).
RESTART_SETTINGS = {"defaults": (), "no admission control": ("--no-overload-protection",)}


async def rolling_restart(index: int, settings: str, settle: float = 1.0) -> Restart:
    """SIGHUP to 2 workers under 16 in-flight Record calls: what the restart cost."""
    import rpcframe
    import rpcframe.aio

    log = Path(tempfile.mkdtemp()) / "records.log"
    server = Server.rpcframe("tests.servicers:aio_worker_probe", 2, *RESTART_SETTINGS[settings],
                             env={"RPCFRAME_RECORD_LOG": str(log)})  # fmt: skip
    result = Restart(settings=settings)
    answered: set[str] = set()
    window = [float("inf"), float("inf")]  # monotonic: SIGHUP sent, restart done
    try:
        old = set(server.pids())
        config = rpcframe.ChannelConfig(connections_per_endpoint=CONNECTIONS, default_timeout=10)
        async with rpcframe.aio.connect(server.target, config) as channel:
            stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
            await _all_ready(channel, CONNECTIONS)
            stop = asyncio.Event()

            async def caller(number: int) -> None:
                for n in range(1_000_000):  # bounded; stop ends it first
                    if stop.is_set():
                        return
                    request_id, started = f"{index}.{number}.{n}", time.monotonic()
                    try:
                        await stub.Record(bench_pb2.RecordRequest(key=f"{request_id}@2"))
                    except grpc.RpcError as exc:
                        result.failed[f"{exc.code().name}: {exc.details()[:60]}"] += 1
                        continue
                    answered.add(request_id)
                    ended = time.monotonic()
                    if ended < window[0]:
                        result.before.append(ended - started)
                    elif started <= window[1]:  # overlaps the restart
                        result.during.append(ended - started)

            tasks = [asyncio.ensure_future(caller(i)) for i in range(RESTART_IN_FLIGHT)]
            await asyncio.sleep(settle)
            window[0] = time.monotonic()
            server.proc.send_signal(signal.SIGHUP)
            until = window[0] + 60
            while "rolling restart done" not in server.stderr() and "rolling restart stopped" not in server.stderr():
                if time.monotonic() > until:
                    break
                await asyncio.sleep(0.01)
            window[1] = time.monotonic()
            result.restart_s = window[1] - window[0]
            result.replaced = not old & set(server.pids())
            await asyncio.sleep(settle)
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        server.stop()
    executions = collections.Counter(line.split()[0] for line in log.read_text().splitlines())
    result.calls = len(answered) + sum(result.failed.values())
    result.duplicated = sum(1 for times in executions.values() if times > 1)
    result.unanswered = len(set(executions) - answered)
    return result


# -- report ---------------------------------------------------------------------------------------


def report(quick: bool, took: float, handler_ms: float, cpu: dict[tuple[str, int, int], list[Run]],
           echo_runs: dict[tuple[str, int], list[Run]], restarts: list[Restart]) -> str:  # fmt: skip
    """The results as markdown."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# Serving on every core: `rpcframe serve --workers N`",
        "",
        f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ({'quick' if quick else 'full'}, {took:.0f} s), "
        f"{os.cpu_count()} CPUs, load average after the run {load}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}. `python -m benchmarks.workers{' --quick' if quick else ''}`. Servers are "
        "child processes on 127.0.0.1; the client is one process (rpcframe asyncio channel on uvloop, closed "
        "loop). Medians over rounds [min-max]; the machine is shared with other work, so read the spread.",
        "",
        f"## CPU-bound handler ({handler_ms:.2f} ms of pure Python per call, calibrated here), "
        f"{CPU_IN_FLIGHT} in flight",
        "",
        "| server | connections | calls/s | p50 ms | p99 ms | server cores | client cores | calls/s per server core "
        "| server CPU ms per call | of it the handler's burn | workers that answered |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in CPU_CASES:
        front, workers, connections = case
        runs = cpu[case]
        lines.append(
            f"| {front}, `--workers {workers}` | {connections} | {_spread([r.qps for r in runs])} "
            f"| {_spread([_percentile(r.latencies, 0.5) * 1000 for r in runs], '{:.1f}')} "
            f"| {_spread([_percentile(r.latencies, 0.99) * 1000 for r in runs], '{:.1f}')} "
            f"| {_spread([r.server_cores for r in runs], '{:.2f}')} "
            f"| {_spread([r.client_cores for r in runs], '{:.2f}')} "
            f"| {_spread([r.qps / r.server_cores for r in runs if r.server_cores])} "
            f"| {_spread([r.server_cores / r.qps * 1000 for r in runs if r.qps], '{:.2f}')} "
            f"| {_spread([statistics.median(r.handler_us) / 1000 for r in runs if r.handler_us], '{:.2f}')} "
            f"| {min(len(r.pids) for r in runs)}-{max(len(r.pids) for r in runs)} |"
        )  # fmt: skip
    lines.append("")
    for front in ("sync", "aio"):
        one, two = cpu[front, 1, CONNECTIONS], cpu[front, 2, CONNECTIONS]
        ratios = [b.qps / a.qps for a, b in zip(one, two, strict=True) if a.qps]
        per_core = [(b.qps / b.server_cores) / (a.qps / a.server_cores) for a, b in zip(one, two, strict=True)
                    if a.server_cores and b.server_cores]  # fmt: skip
        lines.append(f"- {front}: `--workers 2` / `--workers 1`, per round: {_spread(ratios, '{:.2f}')}x "
                     f"(goal 1.7x); calls per server core: {_spread(per_core, '{:.2f}')}x")  # fmt: skip
    lines.append("")
    lines += [
        f"## Echo, 64 B unary, {ECHO_IN_FLIGHT} in flight",
        "",
        "| server | connections | calls/s | p50 ms | p99 ms | server cores | client cores | processes that answered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _ in ECHO_CASES:
        for connections in (1, CONNECTIONS):
            runs = echo_runs[name, connections]
            lines.append(
                f"| {name} | {connections} | {_spread([r.qps for r in runs])} "
                f"| {_spread([_percentile(r.latencies, 0.5) * 1000 for r in runs], '{:.2f}')} "
                f"| {_spread([_percentile(r.latencies, 0.99) * 1000 for r in runs], '{:.2f}')} "
                f"| {_spread([r.server_cores for r in runs], '{:.2f}')} "
                f"| {_spread([r.client_cores for r in runs], '{:.2f}')} "
                f"| {min(len(r.pids) for r in runs)}-{max(len(r.pids) for r in runs)} |"
            )  # fmt: skip
    lines += [
        "",
        f"## Rolling restart (SIGHUP) of `--workers 2`, {RESTART_IN_FLIGHT} in-flight Record calls (2 ms, "
        f"not idempotent), {CONNECTIONS} connections; runs alternate the server settings",
        "",
        "| run | server settings | calls | failed | executed twice | executed, unanswered | restart s "
        "| p50 / p99 ms before | p50 / p99 ms during | both workers replaced |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, r in enumerate(restarts, 1):
        failed = sum(r.failed.values())
        why = f" ({'; '.join(f'{k} x{v}' for k, v in r.failed.items())})" if failed else ""
        lines.append(
            f"| {number} | {r.settings} | {r.calls} | {failed}{why} "
            f"| {r.duplicated} | {r.unanswered} | {r.restart_s:.2f} "
            f"| {_percentile(r.before, 0.5) * 1000:.1f} / {_percentile(r.before, 0.99) * 1000:.1f} "
            f"| {_percentile(r.during, 0.5) * 1000:.1f} / {_percentile(r.during, 0.99) * 1000:.1f} "
            f"| {'yes' if r.replaced else 'NO'} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


async def _main(args: argparse.Namespace) -> tuple[str, bool]:
    started = time.monotonic()
    # Many short rounds: on a shared machine a pair of back-to-back runs sees more alike conditions.
    rounds, seconds, restarts = (2, 3.0, 2) if args.quick else (8, 2.5, 4)
    iterations, handler_ms = calibrate()
    print(f"CPU-bound handler: {iterations} iterations = {handler_ms:.2f} ms here", flush=True)
    cpu = await cpu_bound(rounds, seconds, iterations)
    echo_runs = await echo(rounds, seconds * 0.6)
    restart_runs = []
    for index in range(restarts):
        for settings in RESTART_SETTINGS:
            r = await rolling_restart(index, settings)
            restart_runs.append(r)
            print(f"  rolling restart {index + 1}, {settings}: {r.calls} calls, {sum(r.failed.values())} failed, "
                  f"{r.duplicated} executed twice, {r.restart_s:.2f} s", flush=True)  # fmt: skip
    text = report(args.quick, time.monotonic() - started, handler_ms, cpu, echo_runs, restart_runs)
    return text, all(r.replaced and not r.duplicated for r in restart_runs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios, print and write the report; 1 if a call ran twice or a restart did not finish."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds (~1 min)")
    args = parser.parse_args(argv)
    from rpcframe import _loop

    text, ok = _loop.run(_main(args))
    RESULTS.write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
