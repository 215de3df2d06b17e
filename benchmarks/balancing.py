"""Balancing benchmarks: tail latency across policies, failover timing, pick cost.

Run with ``python -m benchmarks.balancing [--quick]`` (``make bench`` runs it).
Backends run in a separate process (``python -m benchmarks.balancing serve``)
so the load generator and the servers do not share a GIL. Results go to
``benchmarks/results/balancing.{json,md}``.

Scenarios:

- **tail**: tower-rs's balancer demo, rebuilt on real grpc backends: 10
  backends whose per-call service time is uniform in [0, max] with max =
  1, 10, 10, 10, 10, 100, 100, 100, 100, 1000 ms; 50 calls in flight (closed
  loop, asyncio); the same number of calls per policy: rpcframe
  ``round_robin``, ``least_request``, ``peak_ewma`` and grpcio's native
  ``round_robin`` (service config). Anchor: tower-rs reports p99 906 ms
  (round robin) vs 96 ms (P2C peak-EWMA) for this setup.
- **failover**: 3 backend processes under steady load; one is killed with
  SIGKILL (then, in a second run, set NOT_SERVING): failed calls, and the time
  until the endpoint leaves the picker.
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
import subprocess
import sys
import time
from collections.abc import Sequence
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


# -- backends -------------------------------------------------------------------


class DelayedEcho(echo_pb2_grpc.EchoServiceServicer):
    """Echo after a service time uniform in [0, max_delay] (asyncio sleep, so calls overlap)."""

    def __init__(self, max_delay: float, name: str) -> None:
        self.max_delay = max_delay
        self.name = name

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:  # type: ignore[override]
        await asyncio.sleep(random.uniform(0, self.max_delay))
        return pb.EchoResponse(message=self.name)


async def _serve(delays: Sequence[float]) -> None:
    await serve_until_sigterm([DelayedEcho(delay, f"b{i}") for i, delay in enumerate(delays)])


class Backends(ChildServers):
    """A child process serving one delayed echo backend per delay."""

    def __init__(self, delays: Sequence[float]) -> None:
        super().__init__(["-m", "benchmarks.balancing", "serve", "--delays", ",".join(map(str, delays))], len(delays))


# -- tail latency -------------------------------------------------------------------


async def _closed_loop(call: Any, total: int, in_flight: int) -> tuple[HdrHistogram, float, int]:
    """``total`` calls, ``in_flight`` at a time; latency histogram in µs, wall time, errors."""
    histogram = HdrHistogram(1, 120_000_000, 3)
    remaining = total
    errors = 0

    async def worker() -> None:
        nonlocal remaining, errors
        request = pb.EchoRequest(message="x")
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            try:
                await call(request, timeout=30)
            except grpc.RpcError:
                errors += 1
            histogram.record_value(max(1, int((time.perf_counter() - start) * 1e6)))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return histogram, time.perf_counter() - started, errors


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


def _summary(histogram: HdrHistogram, wall: float, errors: int) -> dict[str, float]:
    return {
        "calls": histogram.get_total_count(),
        "errors": errors,
        "wall_s": round(wall, 2),
        "p50_ms": histogram.get_value_at_percentile(50) / 1000,
        "p99_ms": histogram.get_value_at_percentile(99) / 1000,
        "p999_ms": histogram.get_value_at_percentile(99.9) / 1000,
        "max_ms": histogram.get_max_value() / 1000,
    }


async def _tail_policy(policy: str, addresses: list[str], total: int, in_flight: int) -> dict[str, float]:
    if policy == "grpc_native_round_robin":
        options = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]
        target = "ipv4:" + ",".join(addresses)
        async with grpc.aio.insecure_channel(target, options=options) as raw:
            await raw.channel_ready()
            stub = echo_pb2_grpc.EchoServiceStub(raw)
            return _summary(*await _closed_loop(stub.Echo, total, in_flight))
    config = rpcframe.ChannelConfig(policy=policy, slow_start=0)
    async with rpcframe.aio.connect(addresses, config) as channel:
        await _all_ready(channel, len(addresses))
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        return _summary(*await _closed_loop(stub.Echo, total, in_flight))


#: Per-backend maximum service time (s), as in tower-rs's balance demo.
MAX_LATENCIES = (0.001, 0.010, 0.010, 0.010, 0.010, 0.100, 0.100, 0.100, 0.100, 1.000)


async def tail_latency(total: int, in_flight: int = 50) -> dict[str, Any]:
    """The tail-latency scenario for every policy, against one backend process."""
    delays = list(MAX_LATENCIES)
    servers = Backends(delays)
    try:
        results = {}
        for policy in ("round_robin", "least_request", "peak_ewma", "grpc_native_round_robin"):
            results[policy] = await _tail_policy(policy, servers.addresses, total, in_flight)
            print(f"  tail {policy:<24} {results[policy]}", flush=True)
    finally:
        servers.stop()
    return {"delays_ms": [round(d * 1000, 2) for d in delays], "in_flight": in_flight, "policies": results}


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


def _markdown(data: dict[str, Any]) -> str:
    tail = data["tail"]
    lines = [
        "# Balancing benchmarks",
        "",
        f"Tail latency: {len(tail['delays_ms'])} backends, service time per call uniform in [0, max] with max "
        f"{tail['delays_ms']} ms (tower-rs's balance demo), {tail['in_flight']} calls in flight, asyncio client.",
        "",
        "| policy | calls | p50 ms | p99 ms | p99.9 ms | max ms | wall s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in tail["policies"].items():
        lines.append(
            f"| {name} | {r['calls']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p999_ms']:.1f} | "
            f"{r['max_ms']:.1f} | {r['wall_s']} | {r['errors']} |"
        )
    rr, ewma = tail["policies"]["round_robin"], tail["policies"]["peak_ewma"]
    ratio = rr["p99_ms"] / ewma["p99_ms"] if ewma["p99_ms"] else math.inf
    ratio999 = rr["p999_ms"] / ewma["p999_ms"] if ewma["p999_ms"] else math.inf
    lines += [
        "",
        f"peak_ewma vs round_robin: p99 {ratio:.1f}x lower, p99.9 {ratio999:.1f}x lower "
        "(target: p99 >= 9x, p99.9 at least as good; tower-rs: 906 ms -> 96 ms).",
        "",
        "Failover: 3 backend processes, 16 calls in flight, asyncio client, default policy.",
        "",
        "| event | calls | failed | endpoint out of picker after (ms) | calls per backend |",
        "|---|---|---|---|---|",
    ]
    for kind, r in data["failover"].items():
        lines.append(f"| {kind} | {r['calls']} | {r['failed']} | {r['out_of_picker_ms']} | {r['per_backend']} |")
    return "\n".join(lines) + "\n"


async def _scenarios(quick: bool) -> dict[str, Any]:
    print("balancing: tail latency", flush=True)
    data = {"tail": await tail_latency(total=4000 if quick else 20000)}
    print("balancing: failover", flush=True)
    data["failover"] = await failover(seconds=3 if quick else 6)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """Run the balancing scenarios and write the results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.balancing")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="(internal) serve delayed echo backends")
    serve.add_argument("--delays", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer calls (about 30 s in all)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        _loop.run(_serve([float(d) for d in args.delays.split(",")]))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    # One event loop for everything: grpc.aio binds to the first loop it sees.
    data = _loop.run(_scenarios(args.quick))
    data["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "grpcio": grpc.__version__}
    (RESULTS / "balancing.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "balancing.md").write_text(_markdown(data))
    print(_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
