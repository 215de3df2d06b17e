"""Balancing benchmarks: tail latency across policies and fleets, failover timing.

Run with ``python -m benchmarks.balancing [--quick] [--mixes 1,2,...]``
(``make bench`` runs it). Backends run in a separate process (``python -m
benchmarks.balancing serve``) so the load generator and the servers do not
share a GIL. Results go to ``benchmarks/results/balancing.{json,md}``
(``--mixes`` replaces only those mixes in them).

Mixes (10 real grpc backends, 50 calls in flight, closed loop, asyncio
client; rpcframe ``round_robin``, ``least_request``, ``peak_ewma`` and
``filtered_p2c``, the default):

1. **tower**: tower-rs's balancer demo: service time per call uniform in
   [0, max] with max = 1, 10 (x4), 100 (x4), 1000 ms; grpcio's native
   ``round_robin`` too. Anchor: tower-rs reports p99 906 ms (round robin)
   vs 96 ms (P2C peak-EWMA).
2. **degraded**: 3 of 10 backends degraded 50x (uniform [0, 500 ms] vs
   [0, 10 ms]).
3. **log-spaced**: max service times log-spaced from 1 ms to 1 s.
4. **capacity**: each backend serves at most 4 calls at once (the rest
   queue) in a fixed 20 ms, one backend 60 ms: throughput and per-backend
   mean in-flight count (sending everything to the fastest herds).
5. **turns slow**: 10 backends uniform [0, 10 ms]; one turns to
   [0, 500 ms] at t = 10 s and back at t = 20 s (30 s run): time until its
   share of calls falls below 5 %, and until it is used again.

Mixes 1-3 also run short (a 200-call warm-up, then 5 000 measured calls on
a new channel), where the cold start counts, closed-loop and paced at 400
calls/s: in the closed loop the client process saturates its CPU once a
policy avoids the slow backends, so its latency is mostly 50 / throughput
(Little's law) and a better policy shows a worse p50; at an equal offered
load p50 compares the policies. **failover**: 3 backend
processes under steady load; one is killed with SIGKILL (then, in a second
run, set NOT_SERVING): failed calls, and the time until the endpoint leaves
the picker.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from hdrh.histogram import HdrHistogram

import rpcframe
import rpcframe.aio
from benchmarks._children import ChildServers, serve_until_sigterm
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe import _loop

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

POLICIES = ("round_robin", "least_request", "peak_ewma", "filtered_p2c")
IN_FLIGHT = 50
#: Offered load (calls/s) of the paced runs: under round robin's closed-loop throughput on mixes 1-3.
PACED = 400.0


# -- backends -------------------------------------------------------------------


class DelayedEcho(echo_pb2_grpc.EchoServiceServicer):
    """Echo (answering its name) after a service time.

    Uniform in [0, delay] (asyncio sleep, so calls overlap) or, with a
    ``capacity``, a fixed ``delay`` with at most ``capacity`` calls served at
    once (the rest wait in FIFO order). ``set-delay:SECONDS`` changes the
    delay (mix 5 turns a backend slow and back that way).
    """

    def __init__(self, delay: float, name: str, capacity: int = 0) -> None:
        self.delay = delay
        self.name = name
        self.gate = asyncio.Semaphore(capacity) if capacity else None

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:  # type: ignore[override]
        if request.message.startswith("set-delay:"):
            self.delay = float(request.message.partition(":")[2])
        elif self.gate is not None:
            async with self.gate:
                await asyncio.sleep(self.delay)
        else:
            await asyncio.sleep(random.uniform(0, self.delay))
        return pb.EchoResponse(message=self.name)


async def _serve(delays: Sequence[float], capacity: int) -> None:
    """In the child: one server per backend, each announced, until SIGTERM.

    Admission control off: a server that sheds calls its handler would take
    long (or that queue) hands them to the client's failover, and the
    benchmark would measure that instead of the balancing policy.
    """
    config = rpcframe.ServerConfig(reflection=False, grace_period=0, overload=None)
    await serve_until_sigterm([DelayedEcho(delay, f"b{i}", capacity) for i, delay in enumerate(delays)], config)


class Backends(ChildServers):
    """A child process serving one delayed echo backend per delay."""

    def __init__(self, delays: Sequence[float], capacity: int = 0) -> None:
        args = ["-m", "benchmarks.balancing", "serve", "--delays", ",".join(map(str, delays))]
        super().__init__([*args, "--capacity", str(capacity)], len(delays))


@dataclass(frozen=True)
class Mix:
    """One fleet: per-backend delays (see DelayedEcho) and what to report."""

    key: str
    title: str
    delays: tuple[float, ...]
    capacity: int = 0
    switch: bool = False  # mix 5: b0 turns slow and recovers mid-run
    short: bool = False  # also run 200 + 5000 calls (cold start counts)


MIXES = {
    "1": Mix("1", "tower's mix: uniform [0, max], max 1, 10 (x4), 100 (x4), 1000 ms",
             (0.001, 0.010, 0.010, 0.010, 0.010, 0.100, 0.100, 0.100, 0.100, 1.000), short=True),
    "2": Mix("2", "3 of 10 degraded 50x: uniform [0, 500 ms] (b0-b2) vs [0, 10 ms]",
             (0.5,) * 3 + (0.01,) * 7, short=True),
    "3": Mix("3", "log-spaced: uniform [0, max], max 1 ms ... 1 s",
             tuple(round(0.001 * 1000 ** (i / 9), 6) for i in range(10)), short=True),
    "4": Mix("4", "capacity-limited: 4 calls at once per backend, fixed 20 ms (b0: 60 ms), the rest queue",
             (0.06,) + (0.02,) * 9, capacity=4),
    "5": Mix("5", "b0 turns slow: uniform [0, 10 ms]; b0 [0, 500 ms] from t = 10 s to 20 s",
             (0.01,) * 10, switch=True),
}  # fmt: skip


# -- load -------------------------------------------------------------------------


@dataclass
class Run:
    """What one closed-loop run saw."""

    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 120_000_000, 3))
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: int = 0
    wall: float = 0.0
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (start, backend), mix 5


async def _closed_loop(
    call: Any, total: int, *, until: float = math.inf, timeline: bool = False, rate: float = 0.0
) -> Run:
    """``total`` calls (or until ``until``, monotonic), IN_FLIGHT at a time.

    With a ``rate`` (calls/s) call k starts no earlier than k / rate seconds
    in: the same offered load for every policy, below what the client can
    send, so latency is not the client's own queueing (closed at IN_FLIGHT).
    """
    run = Run()
    remaining = total
    origin = time.monotonic()

    async def worker() -> None:
        nonlocal remaining
        request = pb.EchoRequest(message="x")
        while remaining > 0 and time.monotonic() < until:
            remaining -= 1
            if rate:
                await asyncio.sleep(origin + (total - remaining) / rate - time.monotonic())
            start = time.perf_counter()
            started = time.monotonic()
            try:
                reply = await call(request, timeout=30)
            except grpc.RpcError:
                run.errors += 1
                continue
            run.histogram.record_value(max(1, int((time.perf_counter() - start) * 1e6)))
            run.counts[reply.message] += 1
            if timeline:
                run.timeline.append((started - origin, reply.message))

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    run.wall = time.monotonic() - origin
    return run


async def _all_ready(channel: rpcframe.aio.Channel, count: int, within: float = 10.0) -> None:
    """Wait until ``count`` endpoints are READY (polled: there is no event per endpoint)."""
    async with asyncio.timeout(within):
        while sum(state == "READY" for _, state in channel.endpoints()) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _left_picker(channel: rpcframe.aio.Channel, address: str, within: float = 10.0) -> None:
    """Wait until ``address`` is no longer READY in the channel's picker."""
    async with asyncio.timeout(within):
        while dict(channel.endpoints()).get(address) == "READY":  # noqa: ASYNC110
            await asyncio.sleep(0.001)


def _summary(run: Run, backends: int) -> dict[str, Any]:
    histogram, calls = run.histogram, run.histogram.get_total_count()
    return {
        "calls": calls,
        "errors": run.errors,
        "wall_s": round(run.wall, 2),
        "calls_per_s": round(calls / run.wall) if run.wall else 0,
        "p50_ms": histogram.get_value_at_percentile(50) / 1000,
        "p99_ms": histogram.get_value_at_percentile(99) / 1000,
        "p999_ms": histogram.get_value_at_percentile(99.9) / 1000,
        "max_ms": histogram.get_max_value() / 1000,
        "share_pct": [round(100 * run.counts[f"b{i}"] / max(1, calls), 2) for i in range(backends)],
    }


async def _sample_in_flight(channel: rpcframe.aio.Channel, names: dict[str, str], out: dict[str, float]) -> None:
    """Until cancelled: the mean in-flight count per backend, sampled every 5 ms."""
    sums: collections.Counter[str] = collections.Counter()
    samples = 0
    try:
        while True:
            for entry in channel.balancer.entries():
                sums[names[entry.stats.address]] += entry.stats.inflight
            samples += 1
            await asyncio.sleep(0.005)
    finally:
        out.update({name: round(sums[name] / max(1, samples), 2) for name in sorted(names.values())})


async def _switcher(address: str, at: Sequence[tuple[float, float]], origin: float) -> None:
    """Set the backend at ``address`` to each delay at its time (seconds after ``origin``)."""
    async with grpc.aio.insecure_channel(address) as raw:
        stub = echo_pb2_grpc.EchoServiceStub(raw)
        for when, delay in at:
            await asyncio.sleep(max(0.0, origin + when - time.monotonic()))
            await stub.Echo(pb.EchoRequest(message=f"set-delay:{delay}"), timeout=5)


def _window_shares(timeline: list[tuple[float, str]], name: str, width: float) -> dict[int, float]:
    calls: collections.Counter[int] = collections.Counter()
    hits: collections.Counter[int] = collections.Counter()
    for started, backend in timeline:
        calls[int(started / width)] += 1
        hits[int(started / width)] += backend == name
    return {w: hits[w] / calls[w] for w in calls}


def _switch_times(timeline: list[tuple[float, str]], slow_at: float, back_at: float) -> dict[str, float | None]:
    """Mix 5: when b0's share (100 ms windows) fell below 5 % for good, and when it came back."""
    width = 0.1
    shares = _window_shares(timeline, "b0", width)
    first, last = math.ceil(slow_at / width), int(back_at / width) - 1
    low = [w for w in range(first, last + 1) if shares.get(w, 0.0) < 0.05]
    drop = next((w for w in low if all(shares.get(v, 0.0) < 0.05 for v in range(w, last + 1))), None)
    back = next((w for w in sorted(shares) if w * width >= back_at and shares[w] >= 0.05), None)
    first_call = next((t for t, b in sorted(timeline) if t >= back_at and b == "b0"), None)
    return {
        "share_below_5pct_after_s": None if drop is None else round(max(0.0, drop * width - slow_at + width), 2),
        "first_call_after_recovery_s": None if first_call is None else round(first_call - back_at, 3),
        "share_back_to_5pct_after_s": None if back is None else round(back * width + width - back_at, 2),
        "share_pct_while_slow": round(
            100 * sum(b == "b0" for t, b in timeline if slow_at <= t < back_at)
            / max(1, sum(slow_at <= t < back_at for t, _ in timeline)), 2),
    }  # fmt: skip


async def _policy_run(policy: str, mix: Mix, addresses: list[str], total: int, seconds: float) -> dict[str, Any]:
    """One policy over one mix's backends."""
    if policy == "grpc_native_round_robin":
        options = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]
        async with grpc.aio.insecure_channel("ipv4:" + ",".join(addresses), options=options) as raw:
            await raw.channel_ready()
            return _summary(await _closed_loop(echo_pb2_grpc.EchoServiceStub(raw).Echo, total), len(addresses))
    config = rpcframe.ChannelConfig(policy=policy, slow_start=0)
    async with rpcframe.aio.connect(addresses, config) as channel:
        await _all_ready(channel, len(addresses))
        call = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo
        if not mix.switch:
            in_flight: dict[str, float] = {}
            names = {a: f"b{i}" for i, a in enumerate(addresses)}
            sampler = asyncio.ensure_future(_sample_in_flight(channel, names, in_flight)) if mix.capacity else None
            run = await _closed_loop(call, total)
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            return {**_summary(run, len(addresses)), **({"in_flight": in_flight} if in_flight else {})}
        origin = time.monotonic()
        slow_at, back_at = seconds / 3, 2 * seconds / 3
        switch = asyncio.ensure_future(_switcher(addresses[0], [(slow_at, 0.5), (back_at, 0.01)], origin))
        run = await _closed_loop(call, 10**9, until=origin + seconds, timeline=True)
        await switch
        return {**_summary(run, len(addresses)), **_switch_times(run.timeline, slow_at, back_at)}


async def _short_run(policy: str, addresses: list[str], warmup: int, total: int, rate: float = 0.0) -> dict[str, Any]:
    """A new channel: ``warmup`` calls (not measured), then ``total`` measured ones (paced at ``rate``)."""
    config = rpcframe.ChannelConfig(policy=policy, slow_start=0)
    async with rpcframe.aio.connect(addresses, config) as channel:
        await _all_ready(channel, len(addresses))
        call = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo
        await _closed_loop(call, warmup, rate=rate)
        return _summary(await _closed_loop(call, total, rate=rate), len(addresses))


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric medians of repeated runs (the runs themselves kept under "runs")."""
    if len(runs) == 1:
        return runs[0]
    keys = ("p50_ms", "p99_ms", "p999_ms", "max_ms", "calls_per_s", "wall_s")
    merged = {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys}}
    merged["share_pct"] = [
        round(statistics.median(col), 2) for col in zip(*(r["share_pct"] for r in runs), strict=True)
    ]
    return {**merged, "runs": runs}


async def _repeat(times: int, make: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    return _median_run([await make() for _ in range(times)])


async def run_mix(mix: Mix, total: int, seconds: float, short: tuple[int, int], repeat: int) -> dict[str, Any]:
    """Every policy over one mix, against one backend process."""
    servers = Backends(mix.delays, mix.capacity)
    addresses = servers.addresses
    try:
        policies: dict[str, Any] = {}
        shorts: dict[str, Any] = {}
        paced: dict[str, Any] = {}
        for policy in (*POLICIES, "grpc_native_round_robin") if mix.key == "1" else POLICIES:
            policies[policy] = await _repeat(repeat, lambda: _policy_run(policy, mix, addresses, total, seconds))  # noqa: B023
            print(f"  mix {mix.key} {policy:<24} {_brief(policies[policy])}", flush=True)
        if mix.short:
            for policy in POLICIES:
                shorts[policy] = await _repeat(repeat, lambda: _short_run(policy, addresses, *short))  # noqa: B023
                print(f"  mix {mix.key} short {policy:<18} {_brief(shorts[policy])}", flush=True)
            for policy in POLICIES:
                paced[policy] = await _repeat(repeat, lambda: _short_run(policy, addresses, *short, PACED))  # noqa: B023
                print(f"  mix {mix.key} paced {policy:<18} {_brief(paced[policy])}", flush=True)
    finally:
        servers.stop()
    out = {"title": mix.title, "delays_ms": [round(d * 1000, 2) for d in mix.delays], "policies": policies}
    if mix.capacity:
        out["capacity"] = mix.capacity
    if mix.switch:
        out["switch_s"] = [round(seconds / 3, 1), round(2 * seconds / 3, 1), seconds]
    if shorts:
        out["short"] = {"warmup": short[0], "calls": short[1], "policies": shorts}
        out["paced"] = {"warmup": short[0], "calls": short[1], "rate": PACED, "policies": paced}
    return out


def _brief(r: dict[str, Any]) -> str:
    keep = ("calls", "calls_per_s", "p50_ms", "p99_ms", "p999_ms", "share_pct", "in_flight")
    extra = {k: v for k, v in r.items() if k.endswith("_s") and k != "wall_s"}
    return str({**{k: r[k] for k in keep if k in r}, **extra})


# -- failover -----------------------------------------------------------------------


class EchoProcess:
    """``rpcframe serve examples.echo:aio_servicer`` tagged by name (killable)."""

    def __init__(self, name: str) -> None:
        args = [sys.executable, "-m", "rpcframe", "serve", "examples.echo:aio_servicer", "--bind", "127.0.0.1:0",
                "--log-level", "WARNING", "--drain-delay", "1"]  # fmt: skip
        env = {**os.environ, "RPCFRAME_SERVER_ID": name}
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        match = re.fullmatch(r"serving on (\S+)\n", self.proc.stdout.readline())
        if not match:
            self.stop()
            raise RuntimeError(f"backend {name} failed to start")
        self.address = match.group(1)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


async def _failover_run(kind: str, seconds: float, in_flight: int) -> dict[str, Any]:
    procs = [EchoProcess(n) for n in ("a", "b", "c")]
    victim = procs[0]
    try:
        config = rpcframe.ChannelConfig(default_timeout=5)
        async with rpcframe.aio.connect([p.address for p in procs], config) as channel:
            await _all_ready(channel, 3)
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            counts: collections.Counter[str] = collections.Counter()
            failed = 0
            end = time.monotonic() + seconds

            async def caller() -> None:
                nonlocal failed
                while time.monotonic() < end:
                    call = stub.Echo(pb.EchoRequest(message="x"))
                    try:
                        await call
                        counts[dict(await call.trailing_metadata()).get("x-server-id", "?")] += 1
                    except rpcframe.RpcError:
                        failed += 1

            callers = [asyncio.ensure_future(caller()) for _ in range(in_flight)]
            await asyncio.sleep(seconds / 3)
            event_at = time.monotonic()
            if kind == "kill":
                victim.stop(signal.SIGKILL)
            else:
                # SIGTERM starts a drain: NOT_SERVING first, calls still
                # accepted for --drain-delay, so this times the health signal.
                victim.proc.send_signal(signal.SIGTERM)
            await _left_picker(channel, victim.address)
            out_of_picker_ms = (time.monotonic() - event_at) * 1000
            await asyncio.gather(*callers)
            return {
                "calls": sum(counts.values()) + failed,
                "failed": failed,
                "out_of_picker_ms": round(out_of_picker_ms, 1),
                "per_backend": dict(sorted(counts.items())),
            }
    finally:
        for p in procs:
            p.stop()


async def failover(seconds: float, in_flight: int = 16) -> dict[str, Any]:
    """Kill -9 one of three backends under load, then the NOT_SERVING variant."""
    results = {}
    for kind in ("kill", "not_serving"):
        results[kind] = await _failover_run(kind, seconds, in_flight)
        print(f"  failover {kind:<12} {results[kind]}", flush=True)
    return results


# -- report -----------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "inf"


def _table(policies: dict[str, Any], in_flight: bool = False) -> list[str]:
    head = "| policy | calls | p50 ms | p99 ms | p99.9 ms | max ms | calls/s | share per backend b0..b9 (%) |"
    lines = [head + (" mean in flight b0..b9 |" if in_flight else ""), "|---" * (9 if in_flight else 8) + "|"]
    for name, r in policies.items():
        row = (
            f"| {name} | {r['calls']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p999_ms']:.1f} | "
            f"{r['max_ms']:.1f} | {r['calls_per_s']} | {' '.join(f'{x:g}' for x in r['share_pct'])} |"
        )
        if in_flight:
            row += f" {' '.join(f'{x:g}' for x in r.get('in_flight', {}).values())} |"
        lines.append(row)
    return lines


def _versus_rr(policies: dict[str, Any], label: str) -> str:
    rr, new = policies["round_robin"], policies["filtered_p2c"]
    return (
        f"{label}: filtered_p2c vs round_robin: p99 {_ratio(rr['p99_ms'], new['p99_ms'])} lower, "
        f"p99.9 {_ratio(rr['p999_ms'], new['p999_ms'])} lower, p50 {new['p50_ms']:.1f} vs {rr['p50_ms']:.1f} ms "
        f"(peak_ewma: p99 {_ratio(rr['p99_ms'], policies['peak_ewma']['p99_ms'])}, "
        f"p99.9 {_ratio(rr['p999_ms'], policies['peak_ewma']['p999_ms'])})."
    )


def _mix_section(mix: dict[str, Any], key: str) -> list[str]:
    lines = [f"## Mix {key}: {mix['title']}", ""]
    policies = mix["policies"]
    lines += [*_table(policies, in_flight="capacity" in mix), ""]
    if key in ("1", "2", "3"):
        lines.append(_versus_rr(policies, "Steady"))
    if "short" in mix:
        short = mix["short"]
        lines += ["", f"Short runs: {short['warmup']} warm-up calls, then {short['calls']} measured (new channel).", ""]
        lines += [*_table(short["policies"]), "", _versus_rr(short["policies"], "Short")]
        paced = mix["paced"]
        lines += [
            "",
            f"Paced short runs: the same at {paced['rate']:g} calls/s offered to every policy (at most "
            f"{IN_FLIGHT} in flight), so that latency is not the load generator's own queueing.",
            "",
        ]
        lines += [*_table(paced["policies"]), "", _versus_rr(paced["policies"], "Paced")]
    if "capacity" in mix:
        lr, new = policies["least_request"], policies["filtered_p2c"]
        fair = IN_FLIGHT / len(mix["delays_ms"])
        worst = {name: max(r.get("in_flight", {}).values(), default=0.0) / fair for name, r in policies.items()}
        lines.append(
            f"filtered_p2c throughput {new['calls_per_s'] / lr['calls_per_s']:.2f}x least_request's; busiest "
            "backend's mean in-flight vs fair share (5): " + ", ".join(f"{n} {w:.2f}x" for n, w in worst.items()) + "."
        )
    if "switch_s" in mix:
        slow, back, end = mix["switch_s"]
        lines += [
            f"b0 slow from {slow} s to {back} s of {end} s. Share in 100 ms windows.",
            "",
            "| policy | b0 share while slow (%) | share < 5 % for good after (s) | first call after recovery (s) "
            "| share >= 5 % again after (s) |",
            "|---|---|---|---|---|",
        ]
        for name, r in policies.items():
            lines.append(
                f"| {name} | {r['share_pct_while_slow']} | {r['share_below_5pct_after_s']} | "
                f"{r['first_call_after_recovery_s']} | {r['share_back_to_5pct_after_s']} |"
            )
    return [*lines, ""]


def _markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Balancing benchmarks",
        "",
        f"10 backends in one child process, {IN_FLIGHT} calls in flight (closed loop), asyncio client, "
        f"machine: {data.get('machine')}. Latency from the client (includes its own overhead).",
        "",
    ]
    for key, mix in sorted(data.get("mixes", {}).items()):
        lines += _mix_section(mix, key)
    lines += [
        "## Failover",
        "",
        "3 backend processes, 16 calls in flight, asyncio client, default policy.",
        "",
        "| event | calls | failed | endpoint out of picker after (ms) | calls per backend |",
        "|---|---|---|---|---|",
    ]
    for kind, r in data.get("failover", {}).items():
        lines.append(f"| {kind} | {r['calls']} | {r['failed']} | {r['out_of_picker_ms']} | {r['per_backend']} |")
    return "\n".join(lines) + "\n"


async def _scenarios(quick: bool, mixes: Sequence[str], repeat: int, failover_too: bool) -> dict[str, Any]:
    data: dict[str, Any] = {"mixes": {}}
    for key in mixes:
        print(f"balancing: mix {key}", flush=True)
        total, seconds, short = (3000, 9.0, (200, 2000)) if quick else (20000, 30.0, (200, 5000))
        data["mixes"][key] = await run_mix(MIXES[key], total, seconds, short, repeat)
    if failover_too:
        print("balancing: failover", flush=True)
        data["failover"] = await failover(seconds=3 if quick else 6)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """Run the balancing scenarios and write the results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.balancing")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="(internal) serve delayed echo backends")
    serve.add_argument("--delays", required=True)
    serve.add_argument("--capacity", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer calls (about 2 min in all)")
    parser.add_argument("--mixes", default="1,2,3,4,5", help="which mixes (others kept from the last results)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per policy; medians are reported")
    args = parser.parse_args(argv)
    if args.command == "serve":
        _loop.run(_serve([float(d) for d in args.delays.split(",")], args.capacity))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    mixes = [m for m in args.mixes.split(",") if m]
    everything = set(mixes) == set(MIXES)
    # One event loop for everything: grpc.aio binds to the first loop it sees.
    data = _loop.run(_scenarios(args.quick, mixes, args.repeat, failover_too=everything))
    data["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "grpcio": grpc.__version__}
    path = RESULTS / "balancing.json"
    if not everything and path.exists():  # a partial run replaces its mixes only
        old = json.loads(path.read_text())
        data = {**old, "mixes": {**old.get("mixes", {}), **data["mixes"]}, "machine": data["machine"]}
    path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "balancing.md").write_text(_markdown(data))
    print(_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
