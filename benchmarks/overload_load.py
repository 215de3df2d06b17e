"""The overload benchmark's load generator: an open-loop grpc.aio client in its own process.

::

    python -m benchmarks.overload_load PLAN.json OUT.pickle

The plan (JSON, written by :mod:`benchmarks.overload`) names the target and
either a closed-loop capacity ``probe`` or a list of open-loop ``steps``.

Open loop: arrivals are a Poisson process at the step's rate, drawn in
advance of any answer, so calls that are outstanding never slow the arrival
rate (as a server's real clients do not wait for each other). Each call's
500 ms deadline and its latency count from its *intended* send time, so a
generator that falls behind is charged for it (and reports how far, per step).
Outstanding calls are capped (``max_outstanding``); an arrival over the cap is
recorded as not sent (``CAPPED``) and counted.

Every stack is driven by this same raw grpc.aio client (bytes in, bytes out,
no rpcframe), over ``connections`` separate HTTP/2 connections, as a
server's many clients would open: one connection's stream limit
(``max_concurrent_streams``) would otherwise queue calls in this client,
where the server under test cannot see them.

Output: a pickle of per-call arrays (step, intended send time, latency,
status code, criticality class) and the run's clock marks, all on
``time.monotonic()``, the clock the harness samples server CPU on.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from generated.rpcframe.bench.v1 import bench_pb2

METHOD = "/rpcframe.bench.v1.BenchService/Unary"
CRITICALITY_KEY = "rpcframe-criticality"
#: Status value recorded for an arrival not sent because ``max_outstanding`` calls were open.
CAPPED = -1
#: Criticality classes: 0 no header, 1 CRITICAL, 2 SHEDDABLE.
CLASSES = ("default", "CRITICAL", "SHEDDABLE")
#: Share of CRITICAL calls in the mixed step: at 3x offered load they alone
#: are 0.75x capacity, which a server can serve whole (half of 3x would be
#: 1.5x capacity of CRITICAL calls: no server could answer 99 % of them).
CRITICAL_SHARE = 0.25
_METADATA: tuple[tuple[tuple[str, str], ...] | None, ...] = (
    None,
    ((CRITICALITY_KEY, "CRITICAL"),),
    ((CRITICALITY_KEY, "SHEDDABLE"),),
)
CONNECT_WITHIN = 10.0
PROBE_TIMEOUT = 5.0


@dataclass
class Records:
    """Per-call outcomes, one entry per arrival, in compact arrays."""

    step: array.array[int] = field(default_factory=lambda: array.array("b"))
    sent_at: array.array[float] = field(default_factory=lambda: array.array("d"))  # intended send time
    latency: array.array[float] = field(default_factory=lambda: array.array("d"))
    code: array.array[int] = field(default_factory=lambda: array.array("b"))
    klass: array.array[int] = field(default_factory=lambda: array.array("b"))

    def add(self, step: int, sent_at: float, latency: float, code: int, klass: int) -> None:
        """Record one arrival's outcome."""
        self.step.append(step)
        self.sent_at.append(sent_at)
        self.latency.append(latency)
        self.code.append(code)
        self.klass.append(klass)


async def _open(target: str, connections: int) -> tuple[list[grpc.aio.Channel], list[Any]]:
    """``connections`` channels, each on its own connection (a local subchannel pool), all ready."""
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]  # fmt: skip
    async with asyncio.timeout(CONNECT_WITHIN):
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
    return channels, [ch.unary_unary(METHOD) for ch in channels]


async def _call(mc: Any, request: bytes, klass: int, step: int, sent_at: float, deadline: float,
                records: Records) -> None:  # fmt: skip
    """One call with ``deadline`` s from its intended send time; records status and latency."""
    timeout = max(sent_at + deadline - time.monotonic(), 0.001)
    try:
        await mc(request, timeout=timeout, metadata=_METADATA[klass])
        code = 0
    except grpc.aio.AioRpcError as exc:
        code = exc.code().value[0]
    records.add(step, sent_at, time.monotonic() - sent_at, code, klass)


@dataclass
class _Sender:
    """The open-loop arrival process over all steps, and what it observed about itself."""

    mcs: list[Any]
    deadline: float
    max_outstanding: int
    rng: random.Random
    records: Records = field(default_factory=Records)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    sent: int = 0
    capped: int = 0
    max_lag: float = 0.0  # of the current step
    peak_outstanding: int = 0

    def _send(self, request: bytes, klass: int, step: int, sent_at: float) -> None:
        if len(self.tasks) >= self.max_outstanding:
            self.capped += 1
            self.records.add(step, sent_at, 0.0, CAPPED, klass)
            return
        mc = self.mcs[self.sent % len(self.mcs)]
        self.sent += 1
        task = asyncio.create_task(_call(mc, request, klass, step, sent_at, self.deadline, self.records))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.peak_outstanding = max(self.peak_outstanding, len(self.tasks))

    async def step(self, index: int, rate: float, begin: float, seconds: float, mixed: bool) -> float:
        """Poisson arrivals at ``rate``/s from ``begin`` for ``seconds``.

        If ``mixed``, CRITICAL_SHARE of them CRITICAL and the rest SHEDDABLE.
        """
        request = bench_pb2.BenchRequest(count=index).SerializeToString()
        self.max_lag = 0.0
        end, due = begin + seconds, begin + self.rng.expovariate(rate)
        while due < end:
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.max_lag = max(self.max_lag, time.monotonic() - due)
            klass = (1 if self.rng.random() < CRITICAL_SHARE else 2) if mixed else 0
            self._send(request, klass, index, due)
            due += self.rng.expovariate(rate)
        return self.max_lag

    async def drain(self, within: float) -> int:
        """Wait for outstanding calls (bounded); cancels and returns the count of any still open."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=within)
        left = list(self.tasks)
        for task in left:
            task.cancel()
        return len(left)


async def run_steps(plan: dict[str, Any]) -> dict[str, Any]:
    """Every step back to back on one arrival process; per-call records and the clock marks."""
    channels, mcs = await _open(plan["target"], plan["connections"])
    sender = _Sender(mcs, plan["deadline"], plan["max_outstanding"], random.Random(plan.get("seed", 1)))
    cpu0, starts, lags = os.times(), [], []
    begin = time.monotonic() + 0.05
    if warmup := plan.get("warmup"):  # connections, caches and the server's pool warm, not reported
        await sender.step(warmup["tag"], warmup["rate"], begin, warmup["seconds"], False)
        begin += warmup["seconds"]
    for index, step in enumerate(plan["steps"]):
        begin += step.get("gap_before", 0.0)  # idle: the previous step's last calls end undisturbed
        starts.append(begin)
        lags.append(await sender.step(index, step["rate"], begin, step["seconds"], step.get("mixed", False)))
        begin += step["seconds"]
    end = begin
    unfinished = await sender.drain(plan["deadline"] + 5.0)
    cpu1 = os.times()
    await asyncio.gather(*(ch.close() for ch in channels))
    r = sender.records
    return {
        "step_starts": starts,
        "end": end,
        "records": {name: getattr(r, name).tobytes() for name in ("step", "sent_at", "latency", "code", "klass")},
        "sent": sender.sent,
        "capped": sender.capped,
        "unfinished": unfinished,
        "peak_outstanding": sender.peak_outstanding,
        "max_lag_s": max(lags, default=0.0),
        "step_lag_s": lags,
        "client_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }


async def run_probe(plan: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: ``concurrency`` callers back to back; OK answers per second after a warmup."""
    probe = plan["probe"]
    channels, mcs = await _open(plan["target"], plan["connections"])
    request = bench_pb2.BenchRequest(count=plan["tag"]).SerializeToString()
    start = time.monotonic() + probe["warmup"]
    end = start + probe["seconds"]
    counts = {"ok": 0, "errors": 0}

    async def caller(mc: Any) -> None:
        while (now := time.monotonic()) < end:
            try:
                await mc(request, timeout=PROBE_TIMEOUT)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            if now >= start:
                counts["ok" if ok else "errors"] += 1

    await asyncio.gather(*(caller(mcs[i % len(mcs)]) for i in range(probe["concurrency"])))
    await asyncio.gather(*(ch.close() for ch in channels))
    return {**counts, "seconds": probe["seconds"], "rate": counts["ok"] / probe["seconds"]}


def decode_records(raw: dict[str, bytes]) -> Records:
    """The :class:`Records` of a pickled run."""
    records = Records()
    for name, data in raw.items():
        getattr(records, name).frombytes(data)
    return records


def main(argv: list[str] | None = None) -> int:
    """Run the plan in ``argv[0]``, write the pickle to ``argv[1]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.overload_load PLAN.json OUT.pickle", file=sys.stderr)
        return 2
    plan = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run_probe(plan) if "probe" in plan else run_steps(plan))
    Path(args[1]).write_bytes(pickle.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
