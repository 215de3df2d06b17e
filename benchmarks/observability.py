"""What observability costs per call: rpcframe tracing + metrics on vs off, and vs grpcio + its OTel instrumentation.

::

    python -m benchmarks.observability            # full: 8 rounds of 1 + 2 s per stack and front (~10 min)
    python -m benchmarks.observability --quick    # 3 rounds of 0.5 + 1 s (~3 min)
    python -m benchmarks.observability --out /tmp/obs

Unary 64 B, 64 calls in flight, on both fronts (sync: 64 caller threads on
grpc's blocking API, thread-pool servers of 16 workers; asyncio: 64
coroutines, grpc.aio and rpcframe.aio on the default asyncio loop, client and
server). Stacks (``benchmarks/observability_stacks.py``): raw grpcio; raw
grpcio + ``opentelemetry-instrumentation-grpc`` on client and server (the
peer a grpcio user would pick); rpcframe with no observers; rpcframe with
``rpcframe.otel.telemetry()`` on client and server; and, to show where the
cost is, rpcframe with tracing only, with metrics only, with one no-op
observer, and with telemetry() under a 1 % ``ParentBased(TraceIdRatio)``
sampler (reported apart from the headline). Every traced stack has the same
SDK setup: always-on sampling, a BatchSpanProcessor to an exporter that
counts and discards, a MeterProvider with an in-memory reader read once at
the end.

Each server runs in its own process (started and stopped by PID, 127.0.0.1
port 0); each run's load generator is a fresh spawned process
(``rpcframe.bench``'s load loops). Rounds alternate the order of stacks and
fronts. Per run: QPS, latency, and CPU µs per call of the server
(``/proc/PID/stat``) and of the load generator (``os.times``), both over the
measured phase only. Ratios are the median [min–max] over rounds of the
per-round ratio (the two runs of a round are seconds apart, so drift cancels).

Then the **cancelled streams** check, per front in this process: an rpcframe
server and client, both with telemetry() on their own SDK providers; 10,000
(``--streams``) server-streaming calls (1,000 messages of 64 B, 1 ms apart) each cancelled
by the client after its first message (half then read on to the CANCELLED
error, half drop the stream); after the calls, wait (bounded) until every
span started has ended, on both sides, while the server still runs; report
spans started minus ended (expected: 0).

Results: ``benchmarks/results/observability.{md,json}`` (``--out DIR``).
Exits 1 when the check leaves spans open (a leak is a bug, not a cost).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

import rpcframe
import rpcframe.aio
from benchmarks.observability_stacks import (
    BY_NAME,
    STACKS,
    Sdk,
    SpanCounter,
    Stack,
    load_child,
    setup_sdk,
)  # fmt: skip
from benchmarks.run import ServerKind, ServerProcess, _machine, servers, spread
from examples.bench_server import AioBenchServicer, BenchServicer
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc
from rpcframe.bench import LoadSpec, MethodInfo, resolve_method
from rpcframe.bench.histogram import merge, percentiles
from rpcframe.otel import telemetry

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1
METHOD = "rpcframe.bench.v1.BenchService/Unary"
FRONTS = ("sync", "aio")
CONCURRENCY = 64
REQUEST = bench_pb2.BenchRequest(payload=bytes(64), response_size=64)
# Bounds on every load loop besides its measured time.
MAX_CALLS_PER_RUN = 5_000_000
CALL_TIMEOUT = 10.0
SPAWN_SLACK = 60.0  # seconds a load generator may take to start, import and connect
RESULT_TIMEOUT = 30.0
# The cancelled-streams check.
CANCEL_STREAMS = 10_000
CANCEL_REQUEST = bench_pb2.BenchRequest(response_size=64, count=1000, delay=Duration(nanos=1_000_000))
CANCEL_CALLERS = {"sync": 16, "aio": 64}
CANCEL_TIME_LIMIT = 180.0  # per front, whatever the count
SETTLE_TIMEOUT = 10.0


# -- runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedServer(ServerKind):
    """A server of one stack (``stack`` is a stack name) for one front, from benchmarks.observability_stacks."""

    @property
    def name(self) -> str:
        """E.g. ``rpcframe+otel-aio``."""
        return f"{self.stack}-{self.mode}"

    def argv(self) -> list[str]:
        """The command that starts it."""
        return [sys.executable, "-m", "benchmarks.observability_stacks", "--stack", self.stack, f"--{self.mode}",
                "--bind", "127.0.0.1:0", "--workers", "16", "--grace", "2"]  # fmt: skip


@dataclass
class Run:
    """One measured run of one stack on one front."""

    front: str
    stack: str
    round: int
    calls: int
    errors: int
    elapsed_s: float
    throughput: float
    p50_us: int
    p99_us: int
    server_cpu_us: float
    client_cpu_us: float
    cpu_us: float  # server + client, per call
    client_spans_per_call: float
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)


def _spawned(spec: LoadSpec, stack: Stack, timeouts: tuple[float, float]) -> tuple[Any, Any, Any, Any]:
    """Start the load-generator process; returns (process, start barrier, end barrier, result queue)."""
    ctx = multiprocessing.get_context("spawn")  # grpc does not survive fork
    barriers = (ctx.Barrier(2), ctx.Barrier(2))
    results = ctx.Queue()
    process = ctx.Process(target=load_child, args=(spec, stack.name, barriers, results, timeouts), daemon=True,
                          name=f"obs-load-{stack.name}")  # fmt: skip
    process.start()
    return process, barriers[0], barriers[1], results


def _stop_process(process: Any) -> None:
    """Join the load generator; SIGTERM then SIGKILL by PID if it lingers."""
    process.join(10)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


def measure(front: str, stack: Stack, server: ServerProcess, method: MethodInfo, warmup: float, seconds: float
            ) -> tuple[Any, dict[str, float], dict[str, Any]]:  # fmt: skip
    """One load-generator process against ``server``; the server's CPU sampled at the measured phase's barriers."""
    spec = LoadSpec(target=server.target, method=method, request=REQUEST.SerializeToString(), mode=front,  # type: ignore[arg-type]
                    client=stack.client, concurrency=CONCURRENCY, duration=seconds, total=MAX_CALLS_PER_RUN,  # type: ignore[arg-type]
                    warmup=warmup, call_timeout=CALL_TIMEOUT, uvloop=False)  # fmt: skip
    timeouts = (SPAWN_SLACK + warmup, seconds + CALL_TIMEOUT + RESULT_TIMEOUT)
    process, start, end, results = _spawned(spec, stack, timeouts)
    samples: dict[str, float] = {}
    try:
        try:
            start.wait(timeouts[0])
            samples["cpu0"], samples["t0"] = server.cpu_seconds(), time.perf_counter()
            end.wait(timeouts[1])
            samples["cpu1"], samples["t1"] = server.cpu_seconds(), time.perf_counter()
        except threading.BrokenBarrierError:
            pass  # the child aborted the barriers: its error is in the queue
        partial, error, extra = results.get(timeout=RESULT_TIMEOUT)
    finally:
        _stop_process(process)
        results.close()
        results.join_thread()
    if error is not None or "cpu1" not in samples:
        raise RuntimeError(f"{stack.name} {front}: {error or 'load generator did not finish'}")
    return partial, samples, extra


def run_once(front: str, stack: Stack, server: ServerProcess, method: MethodInfo, round_index: int,
             warmup: float, seconds: float) -> Run:  # fmt: skip
    """Measure one stack on one front; per-call figures."""
    partial, samples, extra = measure(front, stack, server, method, warmup, seconds)
    merged = merge([partial])
    calls = merged.ok + merged.failed
    server_us = (samples["cpu1"] - samples["cpu0"]) * 1e6 / calls if calls else 0.0
    client_us = (merged.cpu_user + merged.cpu_system) * 1e6 / calls if calls else 0.0
    stats = percentiles(merged.histogram)
    return Run(
        front=front, stack=stack.name, round=round_index, calls=calls, errors=merged.failed,
        elapsed_s=round(merged.elapsed, 4), throughput=round(calls / merged.elapsed, 1) if merged.elapsed else 0.0,
        p50_us=int(stats["p50"]), p99_us=int(stats["p99"]), server_cpu_us=round(server_us, 1),
        client_cpu_us=round(client_us, 1), cpu_us=round(server_us + client_us, 1),
        client_spans_per_call=round(extra.pop("client_spans", 0) / calls, 3) if calls else 0.0, extra=extra,
    )  # fmt: skip


def order(round_index: int) -> list[tuple[str, Stack]]:
    """Every (front, stack) of a round: fronts and stacks reversed every other round."""
    fronts = FRONTS if round_index % 2 == 0 else FRONTS[::-1]
    stacks = STACKS if round_index % 2 == 0 else STACKS[::-1]
    return [(front, stack) for front in fronts for stack in stacks]


def run_rounds(rounds: int, warmup: float, seconds: float) -> list[Run]:
    """Every stack on every front, ``rounds`` times, servers up for the whole time."""
    method = resolve_method(METHOD, "unused:0")
    kinds = {(front, s.name): ObservedServer(s.name, front) for front in FRONTS for s in STACKS}
    total = rounds * len(kinds)
    runs: list[Run] = []
    print(f"{len(STACKS)} stacks x {len(FRONTS)} fronts x {rounds} rounds = {total} runs of {warmup:g}+{seconds:g} s",
          flush=True)  # fmt: skip
    with servers(list(kinds.values())) as running:
        for r in range(rounds):
            for front, stack in order(r):
                run = run_once(front, stack, running[kinds[(front, stack.name)]], method, r, warmup, seconds)
                runs.append(run)
                print(f"[{len(runs):>3}/{total}] r{r} {front:<4} {stack.name:<17} {run.throughput:>8,.0f}/s  "
                      f"cpu {run.server_cpu_us:>5.0f}+{run.client_cpu_us:>5.0f} µs/call  p50 {run.p50_us:>6} µs"
                      + (f"  errors {run.errors}" if run.errors else ""), flush=True)  # fmt: skip
    return runs


# -- summaries -------------------------------------------------------------------------

METRICS = ("throughput", "cpu_us", "server_cpu_us", "client_cpu_us", "p50_us", "p99_us", "client_spans_per_call")

#: (key, numerator stack, denominator stack, what it answers)
COMPARISONS = (
    ("on_off", "rpcframe+otel", "rpcframe", "rpcframe on / off (goal: QPS ≥ 0.90)"),
    ("on_vs_peer", "rpcframe+otel", "raw+otel", "rpcframe on / raw + instrumentation (goal: QPS > 1)"),
    ("tracing_vs_peer", "rpcframe+tracing", "raw+otel", "rpcframe tracing only / raw + instrumentation"),
    ("off_raw", "rpcframe", "raw", "rpcframe off / raw"),
    ("peer_raw", "raw+otel", "raw", "raw + instrumentation / raw"),
    ("noop_off", "rpcframe+noop", "rpcframe", "rpcframe one no-op observer / off"),
    ("tracing_off", "rpcframe+tracing", "rpcframe", "rpcframe tracing only / off"),
    ("metrics_off", "rpcframe+metrics", "rpcframe", "rpcframe metrics only / off"),
    ("sampled_off", "rpcframe+otel-1%", "rpcframe", "rpcframe on, 1 % sampled / off"),
)


def _paired(runs: list[Run], front: str, a: str, b: str, metric: str, op: str) -> list[float]:
    """Per round: ``a``'s metric divided by (``op`` "ratio") or minus (``op`` "delta") ``b``'s."""
    by = {(r.stack, r.round): getattr(r, metric) for r in runs if r.front == front}
    out = []
    for (stack, rnd), value in sorted(by.items()):
        other = by.get((b, rnd))
        if stack == a and other:
            out.append(value / other if op == "ratio" else value - other)
    return out


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Per front: every stack's spreads, and every comparison's paired ratios and CPU deltas."""
    fronts: dict[str, Any] = {}
    for front in FRONTS:
        stacks: dict[str, dict[str, Any]] = {}
        for stack in STACKS:
            mine = [r for r in runs if r.front == front and r.stack == stack.name]
            if mine:
                stacks[stack.name] = {m: spread([getattr(r, m) for r in mine]) for m in METRICS}
                stacks[stack.name]["errors"] = sum(r.errors for r in mine)
                stacks[stack.name]["extra"] = mine[-1].extra
        comparisons = {}
        for key, a, b, _ in COMPARISONS:
            qps = _paired(runs, front, a, b, "throughput", "ratio")
            if qps:
                cpu = _paired(runs, front, a, b, "cpu_us", "ratio")
                comparisons[key] = {
                    "qps_ratio": spread(qps),
                    "cpu_ratio": spread(cpu),
                    "qps_ratio_rounds": [round(x, 3) for x in qps],
                    "cpu_ratio_rounds": [round(x, 3) for x in cpu],
                    "cpu_delta_us": spread(_paired(runs, front, a, b, "cpu_us", "delta")),
                    "server_delta_us": spread(_paired(runs, front, a, b, "server_cpu_us", "delta")),
                    "client_delta_us": spread(_paired(runs, front, a, b, "client_cpu_us", "delta")),
                }  # fmt: skip
        fronts[front] = {"stacks": stacks, "comparisons": comparisons}
    return fronts


def _verdict(rounds: list[float], holds: Callable[[float], bool]) -> str:
    """Met when the goal holds in at least 80 % of rounds, NOT met in at most 20 %, else undecided (noise)."""
    n = sum(1 for x in rounds if holds(x))
    word = "met" if n >= 0.8 * len(rounds) else "NOT met" if n <= 0.2 * len(rounds) else "undecided"
    return f"{word} ({n} of {len(rounds)} rounds)"


def goals(summary: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The issue's three goals per front: the measured ratios and a verdict over the paired rounds."""
    out: dict[str, dict[str, str]] = {}
    for front, data in summary.items():
        c = data["comparisons"]
        if not {"noop_off", "on_off", "on_vs_peer", "tracing_vs_peer"} <= c.keys():
            continue
        noop, on, peer, tracing = c["noop_off"], c["on_off"], c["on_vs_peer"], c["tracing_vs_peer"]
        rounds = noop["cpu_ratio_rounds"]
        dearer = sum(1 for x in rounds if x > 1.0)  # under noise alone, about half the rounds
        seam = "measurable" if dearer >= 0.8 * len(rounds) else "not measurable"
        out[front] = {
            "off_costs_nothing": f"off = no observers: per call nothing is called or allocated, only `is None` "
                                 f"tests. Upper bound, one no-op observer on both sides: {_r(noop['cpu_ratio'])} "
                                 f"CPU/call, {_r(noop['qps_ratio'])} QPS; {seam} (more CPU than off in {dearer} "
                                 f"of {len(rounds)} rounds)",
            "on_within_10pct": f"{_r(on['qps_ratio'])} QPS, {_r(on['cpu_ratio'])} CPU/call: "
                               + _verdict(on["qps_ratio_rounds"], lambda x: x >= 0.90),
            "faster_than_peer": f"telemetry(): {_r(peer['qps_ratio'])} QPS, {_r(peer['cpu_ratio'])} CPU/call: "
                                + _verdict(peer["qps_ratio_rounds"], lambda x: x > 1.0)
                                + f". Tracing only (like for like): {_r(tracing['qps_ratio'])} QPS, "
                                  f"{_r(tracing['cpu_ratio'])} CPU/call: "
                                + _verdict(tracing["qps_ratio_rounds"], lambda x: x > 1.0),
        }  # fmt: skip
    return out


def _r(s: dict[str, float]) -> str:
    return f"{s['median']:.2f}× [{s['min']:.2f}–{s['max']:.2f}]"


# -- cancelled streams -----------------------------------------------------------------


@dataclass
class Side:
    """One side of the check: its SDK providers and span counter."""

    sdk: Sdk
    spans: SpanCounter

    @classmethod
    def new(cls) -> Side:
        """Providers of its own (this process's globals stay untouched), counting spans by status."""
        spans = SpanCounter(by_status=True)
        return cls(setup_sdk(make_global=False, counter=spans), spans)

    def observers(self) -> tuple[Any, ...]:
        """telemetry() on this side's providers."""
        return telemetry(self.sdk.tracer_provider, self.sdk.meter_provider)

    def report(self) -> dict[str, Any]:
        """Started, ended, open, and ended spans per (kind, rpc.grpc.status_code)."""
        c = self.spans
        by_status = {f"{kind} {code}": n for (kind, code), n in sorted(c.statuses.items(), key=str)}
        return {"started": c.started, "ended": c.ended, "open": c.open, "ended_by_kind_status": by_status}


def _cancel_one_sync(stub: Any, i: int) -> str:
    """One stream cancelled after its first message; odd ones are then dropped, even ones read on."""
    stream = stub.ServerStream(CANCEL_REQUEST, timeout=CALL_TIMEOUT)
    try:
        for _ in stream:
            stream.cancel()
            if i % 2:
                return "dropped"
    except grpc.RpcError as exc:
        return f"read on: {exc.code().name}"
    return "completed (not cancelled)"


async def _cancel_one_aio(stub: Any, i: int) -> str:
    """:func:`_cancel_one_sync` on asyncio (``return`` from ``async for`` drops the stream)."""
    call = stub.ServerStream(CANCEL_REQUEST, timeout=CALL_TIMEOUT)
    try:
        async for _ in call:
            call.cancel()
            if i % 2:
                return "dropped"
    except grpc.RpcError as exc:
        return f"read on: {exc.code().name}"
    return "completed (not cancelled)"


def _settled(client: Side, server: Side, at_last_call: tuple[int, int], waited: float, outcomes: Counter[str]
             ) -> dict[str, Any]:  # fmt: skip
    """The check's figures; spans left open are counted again after a full garbage collection."""
    report = {"streams": outcomes.total(), "outcomes": dict(outcomes), "settle_wait_s": round(waited, 3),
              "open_at_last_call": {"client": at_last_call[0], "server": at_last_call[1]},
              "client": client.report(), "server": server.report()}  # fmt: skip
    if client.spans.open or server.spans.open:
        gc.collect()
        report["open_after_gc"] = {"client": client.spans.open, "server": server.spans.open}
    return report


def _sync_callers(stub: Any, streams: int) -> Counter[str]:
    """``streams`` cancelled streams from CANCEL_CALLERS["sync"] threads (bounded by CANCEL_TIME_LIMIT)."""
    claim, stop_at = itertools.count(), time.monotonic() + CANCEL_TIME_LIMIT
    counters = [Counter[str]() for _ in range(CANCEL_CALLERS["sync"])]

    def caller(outcomes: Counter[str]) -> None:
        while time.monotonic() < stop_at and (i := next(claim)) < streams:
            outcomes[_cancel_one_sync(stub, i)] += 1

    threads = [threading.Thread(target=caller, args=(c,), daemon=True) for c in counters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + CALL_TIMEOUT)
    return sum(counters, Counter[str]())


def cancelled_sync(streams: int) -> dict[str, Any]:
    """The check on the thread-pool server and the blocking client."""
    client, server_side = Side.new(), Side.new()
    config = rpcframe.ServerConfig(max_workers=16, max_concurrent_streams=1000, grace_period=1,
                                   observers=server_side.observers())  # fmt: skip
    server = rpcframe.Server(config)
    server.add(BenchServicer())
    port = server.bind("127.0.0.1:0")
    server.start()
    try:
        with rpcframe.connect(f"127.0.0.1:{port}", rpcframe.ChannelConfig(observers=client.observers())) as channel:
            outcomes = _sync_callers(channel.stub(bench_pb2_grpc.BenchServiceStub), streams)
            t0, at_last_call = time.monotonic(), (client.spans.open, server_side.spans.open)
            client.spans.wait_settled(SETTLE_TIMEOUT)
            server_side.spans.wait_settled(max(0.0, SETTLE_TIMEOUT - (time.monotonic() - t0)))
            return _settled(client, server_side, at_last_call, time.monotonic() - t0, outcomes)
    finally:
        server.stop(0)
        client.sdk.shutdown()
        server_side.sdk.shutdown()


async def _aio_callers(stub: Any, streams: int) -> Counter[str]:
    """``streams`` cancelled streams from CANCEL_CALLERS["aio"] tasks (bounded by CANCEL_TIME_LIMIT)."""
    claim, outcomes, stop_at = itertools.count(), Counter[str](), time.monotonic() + CANCEL_TIME_LIMIT

    async def caller() -> None:
        while time.monotonic() < stop_at and (i := next(claim)) < streams:
            outcomes[await _cancel_one_aio(stub, i)] += 1

    async with asyncio.timeout(CANCEL_TIME_LIMIT + CALL_TIMEOUT):
        await asyncio.gather(*(caller() for _ in range(CANCEL_CALLERS["aio"])))
    return outcomes


async def cancelled_aio(streams: int) -> dict[str, Any]:
    """The check on the asyncio server and client (both on this loop)."""
    client, server_side = Side.new(), Side.new()
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1, observers=server_side.observers()))
    server.add(AioBenchServicer())
    port = server.bind("127.0.0.1:0")
    await server.start()
    try:
        config = rpcframe.ChannelConfig(observers=client.observers())
        async with rpcframe.aio.connect(f"127.0.0.1:{port}", config) as channel:
            outcomes = await _aio_callers(channel.stub(bench_pb2_grpc.BenchServiceStub), streams)
            t0, at_last_call = time.monotonic(), (client.spans.open, server_side.spans.open)
            # Waited for on a thread: the spans end on this loop, which must keep running.
            await asyncio.to_thread(client.spans.wait_settled, SETTLE_TIMEOUT)
            left = max(0.0, SETTLE_TIMEOUT - (time.monotonic() - t0))
            await asyncio.to_thread(server_side.spans.wait_settled, left)
            return _settled(client, server_side, at_last_call, time.monotonic() - t0, outcomes)
    finally:
        await server.stop(0)
        client.sdk.shutdown()
        server_side.sdk.shutdown()


def cancelled_streams(streams: int) -> dict[str, Any]:
    """The check on both fronts."""
    out = {}
    for front in FRONTS:
        t0 = time.monotonic()
        report = cancelled_sync(streams) if front == "sync" else asyncio.run(cancelled_aio(streams))
        report["duration_s"] = round(time.monotonic() - t0, 1)
        out[front] = report
        print(f"cancelled streams, {front}: {report['streams']} streams in {report['duration_s']:.0f} s, "
              f"open spans client {report['client']['open']}, server {report['server']['open']}, "
              f"outcomes {report['outcomes']}", flush=True)  # fmt: skip
    return out


# -- report ----------------------------------------------------------------------------


def _fmt(value: float, metric: str) -> str:
    if metric == "throughput":
        return f"{value / 1000:.2f}k" if value >= 1000 else f"{value:.0f}"
    if metric == "client_spans_per_call":
        return f"{value:.2f}"
    return f"{value:.0f}"


def _cell(stats: dict[str, float], metric: str) -> str:
    return f"{_fmt(stats['median'], metric)} [{_fmt(stats['min'], metric)}–{_fmt(stats['max'], metric)}]"


def _delta(stats: dict[str, float]) -> str:
    return f"{stats['median']:+.0f} [{stats['min']:+.0f}…{stats['max']:+.0f}]"


def _goal_rows(doc: dict[str, Any]) -> list[str]:
    lines = ["| goal | sync | asyncio |", "|---|---|---|"]
    labels = (
        ("off_costs_nothing", "observability off costs nothing measurable"),
        ("on_within_10pct", "on (telemetry() both sides) costs ≤ 10 % QPS: rpcframe on / off"),
        ("faster_than_peer", "rpcframe with tracing on is faster than raw grpcio + opentelemetry-instrumentation-grpc "
                             "(QPS ratio > 1)"),
    )  # fmt: skip
    for key, label in labels:
        lines.append(f"| {label} | " + " | ".join(doc["goals"].get(f, {}).get(key, "–") for f in FRONTS) + " |")
    cancelled = doc.get("cancelled")
    if cancelled:
        cells = []
        for front in FRONTS:
            c = cancelled[front]
            left = c["client"]["open"] + c["server"]["open"]
            cells.append(f"{c['streams']:,} streams: {c['client']['open']} client + {c['server']['open']} server "
                         f"spans open: {'met' if left == 0 else 'NOT met'}")  # fmt: skip
        lines.append(f"| {cancelled[FRONTS[0]]['streams']:,} cancelled streams leave 0 open spans | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return lines


def _comparison_rows(doc: dict[str, Any]) -> list[str]:
    lines = ["| comparison | sync QPS | sync CPU/call | asyncio QPS | asyncio CPU/call |", "|---|---|---|---|---|"]
    for key, _, _, label in COMPARISONS:
        cells = []
        for front in FRONTS:
            c = doc["fronts"][front]["comparisons"].get(key)
            cells += [_r(c["qps_ratio"]), _r(c["cpu_ratio"])] if c else ["–", "–"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _stack_rows(doc: dict[str, Any]) -> list[str]:
    lines = [
        "| front | stack | QPS | CPU µs/call (server + client) | server µs | client µs | p50 µs | p99 µs "
        "| client spans/call | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for front in FRONTS:
        for name, s in doc["fronts"][front]["stacks"].items():
            cells = " | ".join(_cell(s[m], m) for m in METRICS)
            lines.append(f"| {front} | {BY_NAME[name].title} | {cells} | {s['errors']} |")
    return lines


def _cost_rows(doc: dict[str, Any]) -> list[str]:
    keys = (("noop_off", "no-op observer"), ("tracing_off", "tracing only"), ("metrics_off", "metrics only"),
            ("on_off", "tracing + metrics"), ("sampled_off", "tracing + metrics, 1 % sampled"),
            ("peer_raw", "raw: opentelemetry-instrumentation-grpc"))  # fmt: skip
    lines = ["| front | added | CPU µs/call | of which server | of which client |", "|---|---|---|---|---|"]
    for front in FRONTS:
        for key, label in keys:
            c = doc["fronts"][front]["comparisons"].get(key)
            if c:
                lines.append(f"| {front} | {label} | {_delta(c['cpu_delta_us'])} | {_delta(c['server_delta_us'])} "
                             f"| {_delta(c['client_delta_us'])} |")  # fmt: skip
    return lines


def _cancel_rows(doc: dict[str, Any]) -> list[str]:
    lines = ["| front | streams | outcomes | open at the last call's end (client, server) | client spans started / "
             "ended / open | server spans started / ended / open | waited | spans ended by kind, status code |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for front, c in doc["cancelled"].items():
        cl, sv = c["client"], c["server"]
        outcomes = ", ".join(f"{k}: {v:,}" for k, v in sorted(c["outcomes"].items()))
        ended = cl["ended_by_kind_status"] | sv["ended_by_kind_status"]
        statuses = ", ".join(f"{k}: {v:,}" for k, v in ended.items())
        first = c["open_at_last_call"]
        gc_note = f" (after gc.collect(): {c['open_after_gc']})" if "open_after_gc" in c else ""
        lines.append(f"| {front} | {c['streams']:,} | {outcomes} | {first['client']}, {first['server']} "
                     f"| {cl['started']:,} / {cl['ended']:,} / "
                     f"**{cl['open']}** | {sv['started']:,} / {sv['ended']:,} / **{sv['open']}**{gc_note} "
                     f"| {c['settle_wait_s']:.2f} s | {statuses} |")  # fmt: skip
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown report."""
    s, m = doc["settings"], doc["machine"]
    lines = [
        "# Observability: what tracing + metrics cost per call",
        "",
        f"Run {doc['started_at']} ({'quick' if s['quick'] else 'full'}, {doc['duration_s']:.0f} s, commit "
        f"{doc['commit']}): unary 64 B, {s['concurrency']} calls in flight, {s['rounds']} rounds of "
        f"{s['warmup_s']:g} s warmup + {s['measure_s']:g} s measured per stack and front, order of stacks and "
        f"fronts reversed every other round. {m['cpus']} CPUs (shared, noisy), Python {m['python']}, grpcio "
        f"{m['grpcio']}, opentelemetry-sdk {doc['otel']['sdk']}, opentelemetry-instrumentation-grpc "
        f"{doc['otel']['instrumentation']}. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_1_5_15_before'])}; after: "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_1_5_15_after'])}.",
        "",
        "Every traced stack: always-on sampling (except the 1 % row), a BatchSpanProcessor to an exporter that "
        "counts and discards, a MeterProvider with an in-memory reader (read once, after the run); the same on "
        "client and server. Sync: 64 caller threads, thread-pool servers of 16 workers; asyncio: 64 coroutines, "
        "default asyncio loop on both sides. Server CPU from /proc/PID/stat, load generator CPU from os.times, "
        "both over the measured phase. Values are median [min–max] over rounds; ratios and deltas are taken per "
        "round (runs of a round are seconds apart) and then summarized the same way. Both processes share 2 "
        "cores, so QPS follows total CPU per call.",
        "",
        "## The issue's goals",
        "",
        *_goal_rows(doc),
        "",
        "## Ratios",
        "",
        *_comparison_rows(doc),
        "",
        "## Per stack",
        "",
        *_stack_rows(doc),
        "",
        "Client spans per call: rpcframe makes a call span and an attempt span per call, the official "
        "instrumentation one client span; each server makes one span per call.",
        "",
        "## Where the cost is: CPU µs per call added, vs rpcframe with no observers (last row: vs raw grpcio)",
        "",
        *_cost_rows(doc),
        "",
    ]
    if doc.get("cancelled"):
        lines += ["## Cancelled streams", "", CANCEL_TEXT, "", *_cancel_rows(doc), ""]
    return "\n".join(lines)


CANCEL_TEXT = (
    "An rpcframe server and client in one process per front, each with telemetry() on its own providers "
    "(always-on, a span counter on on_start/on_end). Each server-streaming call asks for 1,000 messages of 64 B, "
    "1 ms apart, and is cancelled by the client after its first message; even-numbered calls then read on to "
    "the error, odd ones drop the stream. After the last call: wait (at most 10 s) until spans ended = spans "
    "started on both sides, with the server still running; open = started − ended at that point. Status code 1 "
    "is CANCELLED; the client makes a call span and an attempt span per stream, the server one span."
)


# -- main ------------------------------------------------------------------------------


def _commit() -> str:
    """The commit measured: git's, or ``RPCFRAME_COMMIT`` for a snapshot without .git (``git archive``)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("RPCFRAME_COMMIT", "unknown")
    return out.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def _otel_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"sdk": version("opentelemetry-sdk"), "instrumentation": version("opentelemetry-instrumentation-grpc")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.observability", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.5 + 1 s (about 3 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 8, quick 3)")
    parser.add_argument("--measure", type=float, default=None, help="measured seconds per run (default 2, quick 1)")
    parser.add_argument("--warmup", type=float, default=None, help="warmup seconds per run (default 1, quick 0.5)")
    parser.add_argument("--streams", type=int, default=CANCEL_STREAMS, help="cancelled streams per front "
                        f"(default {CANCEL_STREAMS:,}; 0 skips the check)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR", help="where observability.{md,json} go")
    parser.add_argument("--rewrite-md", action="store_true",
                        help="only redo the summaries of DIR/observability.json and rewrite both files")  # fmt: skip
    return parser


def _write(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "observability.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "observability.md").write_text(markdown(doc), encoding="utf-8")


def _rewrite(out: Path) -> int:
    """Summaries, goals and the report again from the runs of a saved run."""
    doc = json.loads((out / "observability.json").read_text(encoding="utf-8"))
    doc["fronts"] = summarize([Run(**row) for row in doc["runs"]])
    doc["goals"] = goals(doc["fronts"])
    _write(doc, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and the cancelled-streams check; write the results (exit 1 when spans stay open)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rewrite_md:
        return _rewrite(args.out)
    rounds = args.rounds or (3 if args.quick else 8)  # many short rounds: medians hold up on a shared machine
    measure = args.measure or (1.0 if args.quick else 2.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    if rounds < 1 or measure <= 0 or warmup < 0 or args.streams < 0:
        parser.error("--rounds must be >= 1, --measure > 0, --warmup and --streams >= 0")
    started, load_before = time.time(), os.getloadavg()
    runs = run_rounds(rounds, warmup, measure)
    cancelled = cancelled_streams(args.streams) if args.streams else {}
    summary = summarize(runs)
    settings = dict(quick=args.quick, rounds=rounds, warmup_s=warmup, measure_s=measure, concurrency=CONCURRENCY)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "started_at": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "commit": _commit(),
        "settings": settings,
        "machine": {**_machine(), "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "otel": _otel_versions(),
        "stacks": {s.name: s.title for s in STACKS},
        "goals": goals(summary),
        "fronts": summary,
        "cancelled": cancelled,  # settings of the check: the CANCEL_* constants, streams in each report
        "runs": [r.row() for r in runs],
    }
    _write(doc, args.out)
    print()
    print(markdown(doc))
    print(f"wrote {args.out / 'observability.json'} and {args.out / 'observability.md'} in {doc['duration_s']:.0f} s")
    leaked = sum(c["client"]["open"] + c["server"]["open"] for c in cancelled.values())
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
