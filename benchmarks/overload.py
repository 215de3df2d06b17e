"""Overload: goodput, latency and recovery of a fixed-capacity server offered more than it can do.

::

    python -m benchmarks.overload                 # both fronts, 30 s steps (~25 min on 2 cores)
    python -m benchmarks.overload --quick         # 5 s steps (~2.5 min per front)
    python -m benchmarks.overload --quick --front sync --stacks raw,rpcframe-off --out /tmp/overload

The server (:mod:`benchmarks.overload_server`, its own process, started and
stopped by PID on 127.0.0.1 port 0) does ~2 ms of pure-Python CPU work per
unary call, so one process has a fixed capacity. Per front (thread pool,
asyncio) and stack (``raw`` grpcio, ``rpcframe-off`` = rpcframe with
``ServerConfig(overload=None)``, ``rpcframe`` = defaults, ``rpcframe-queue`` =
defaults plus ``OverloadConfig(accept_queue=16)``):

1. capacity: a closed-loop probe (8 callers back to back) measures OK
   calls/s; the reference stack's figure (raw if run, else rpcframe-off)
   sets the offered rates of every stack, so all see the same load;
2. an open-loop load (:mod:`benchmarks.overload_load`, its own process, the
   same raw grpc.aio client for every stack, Poisson arrivals over 64
   connections) offers, after an unreported warmup at 0.5×, 0.5×, 1×, 2×,
   3×, 5× of that capacity, then drops back to 0.5× (recovery), then, after
   a 1 s pause, 3× with a quarter of the calls ``rpcframe-criticality:
   CRITICAL`` (0.75× capacity) and the rest ``SHEDDABLE``. Every call has a
   500 ms deadline.

Per step: offered rate, goodput (OK within the deadline, per second), p50/p99
of admitted calls (answered OK), the share rejected fast (RESOURCE_EXHAUSTED,
UNAVAILABLE or CANCELLED within 10 ms), the share that hit the deadline, server CPU
(``/proc/PID/stat``), the handler CPU spent on calls that finished past
their deadline (counted by the server per call), and how busy the whole
machine was and how late the generator sent (noisy neighbours show in
both; the machine has 2 cores and is shared). Recovery: seconds from the
drop to 0.5× until a 250 ms window of sends is again ≥ 95 % OK within the
deadline. Results: ``overload.md``, ``overload.json`` and ``overload.png``
(goodput vs offered load, and goodput over time) in ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import os
import pickle
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from benchmarks.overload_load import CAPPED, CLASSES, Records, decode_records
from benchmarks.overload_server import ACCEPT_QUEUE, FRONTS, MAX_STEPS, STACKS, calibrate, overload_supported
from rpcframe.bench.cpu import process_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1

WORK_S = 0.002  # handler CPU per call
DEADLINE_S = 0.5
LOAD_STEPS = (0.5, 1.0, 2.0, 3.0, 5.0)
RECOVERY_LOAD, MIXED_LOAD = 0.5, 3.0
FAST_REJECT_S = 0.010
WINDOW_S, WINDOW_SLIDE_S, GOOD_SHARE = 0.25, 0.05, 0.95
TIMELINE_BUCKET_S = 0.25
PROBE_CONCURRENCY = 8
PROBE_TAG = MAX_STEPS - 1  # the server's ledger slots for probe and warmup calls, apart from every step's
WARMUP_TAG = MAX_STEPS - 2
CONNECTIONS = 64
MAX_OUTSTANDING = 5000
LAG_WARN_MS = 50
SERVER_START_WITHIN, SERVER_STOP_WITHIN = 30.0, 15.0
LOADGEN_STARTUP_S = 30.0  # on top of the plan's own length, before the load generator is killed
# Acceptance (issue 12), for rpcframe with default settings.
KEEP_GOODPUT, P99_FACTOR, RECOVER_WITHIN, CRITICAL_OK = 0.90, 2.0, 2.0, 0.99
_OK, _DEADLINE = grpc.StatusCode.OK.value[0], grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
# CANCELLED: what grpc's core answers for a call it refuses from a full accept queue.
_REJECT = {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.UNAVAILABLE.value[0],
           grpc.StatusCode.CANCELLED.value[0]}  # fmt: skip
_NAMES = {code.value[0]: code.name for code in grpc.StatusCode} | {CAPPED: "NOT_SENT_CAP"}


@dataclass(frozen=True)
class Step:
    """One step of the load: its label, multiple of capacity, and whether calls carry mixed criticality."""

    label: str
    load: float
    mixed: bool = False
    gap_before: float = 0.0  # seconds without arrivals before the step


STEPS = (
    *(Step(f"{x:g}×", x) for x in LOAD_STEPS),
    Step(f"{RECOVERY_LOAD:g}× after {LOAD_STEPS[-1]:g}×", RECOVERY_LOAD),
    # After a pause, so no call of the recovery step waits behind this step's load.
    Step(f"{MIXED_LOAD:g}× mixed", MIXED_LOAD, mixed=True, gap_before=DEADLINE_S + 0.5),
)
RECOVERY_STEP = len(LOAD_STEPS)
MIXED_STEP = RECOVERY_STEP + 1


@dataclass(frozen=True)
class Settings:
    """What one invocation runs."""

    quick: bool
    step_s: float
    probe_s: float
    warmup_s: float  # unreported load at the first step's rate before it
    fronts: tuple[str, ...]
    stacks: tuple[str, ...]
    connections: int
    capacity: float | None  # calls/s given on the command line instead of the probe's
    iterations: int
    accept_queue: int  # OverloadConfig.accept_queue of the rpcframe-queue stack


# -- processes ---------------------------------------------------------------------------


class ServerProcess:
    """One :mod:`benchmarks.overload_server` process, known by PID."""

    def __init__(self, stack: str, front: str, iterations: int, stats: Path, log: IO[str], accept_queue: int) -> None:
        argv = [sys.executable, "-m", "benchmarks.overload_server", "--stack", stack, "--front", front,
                "--iterations", str(iterations), "--stats", str(stats),
                "--accept-queue", str(accept_queue)]  # fmt: skip
        self.name, self.stats, self._log = f"{stack}/{front}", stats, log
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        self.pid = self.proc.pid
        self.target = self._wait_ready()

    def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        stdout, lines = self.proc.stdout, []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(SERVER_START_WITHIN)
        match = re.fullmatch(r"serving on (\S+:\d+)\n", lines[0]) if lines else None
        if match is None:
            self.stop()
            raise RuntimeError(f"{self.name} server did not start: {lines} {self.log_tail()}")
        return match.group(1)

    def log_tail(self, size: int = 2000) -> str:
        """The end of the server's stderr."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-size:]

    def stop(self) -> dict[str, Any]:
        """SIGTERM by PID (SIGKILL if it has not exited in time); the per-step totals it wrote."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(SERVER_STOP_WITHIN)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(SERVER_STOP_WITHIN)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        try:
            ledger: dict[str, Any] = json.loads(self.stats.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            ledger = {}
        return ledger


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy (``/proc/stat``), so noisy neighbours show."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Series:
    """Cumulative CPU seconds sampled over time (``time.monotonic()`` stamps)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def at(self, when: float) -> float:
        """CPU seconds at ``when``, interpolated between samples."""
        i = bisect.bisect_left(self.times, when)
        if i <= 0 or i >= len(self.times):
            return self.cpu[min(max(i, 0), len(self.cpu) - 1)] if self.cpu else 0.0
        t0, t1, c0, c1 = self.times[i - 1], self.times[i], self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * (when - t0) / (t1 - t0)

    def cores(self, begin: float, seconds: float) -> float:
        """Cores used on average from ``begin`` for ``seconds``."""
        return (self.at(begin + seconds) - self.at(begin)) / seconds


class CpuSampler:
    """The server's and the whole machine's CPU seconds every 0.1 s, on a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.server, self.machine = Series(), Series()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while True:
            try:
                cpu = process_cpu_seconds(self.pid)
            except OSError:
                return
            now = time.monotonic()
            for series, value in ((self.server, cpu), (self.machine, machine_busy_seconds())):
                series.times.append(now)
                series.cpu.append(value)
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def run_loadgen(plan: dict[str, Any], within: float) -> dict[str, Any]:
    """One :mod:`benchmarks.overload_load` process for ``plan``; killed by PID if it runs past ``within`` s."""
    with tempfile.TemporaryDirectory(prefix="overload-load-") as tmp:
        plan_path, out_path = Path(tmp) / "plan.json", Path(tmp) / "out.pickle"
        plan_path.write_text(json.dumps(plan), encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.overload_load", str(plan_path), str(out_path)],
                                cwd=REPO)  # fmt: skip
        try:
            code = proc.wait(within)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"load generator ran past {within:.0f} s and was killed") from None
        if code != 0 or not out_path.exists():
            raise RuntimeError(f"load generator failed with exit code {code}")
        result: dict[str, Any] = pickle.loads(out_path.read_bytes())
        return result


# -- analysis ------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (nearest rank) of sorted ``values``."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def _good(code: int, latency: float) -> bool:
    return code == _OK and latency <= DEADLINE_S


def step_metrics(records: Records, rows: list[int], seconds: float) -> dict[str, Any]:
    """Client-side figures of one step's arrivals (``rows`` index ``records``)."""
    n = len(rows)
    codes = Counter(records.code[i] for i in rows)
    admitted = sorted(records.latency[i] for i in rows if records.code[i] == _OK)
    good = sum(1 for i in rows if _good(records.code[i], records.latency[i]))
    fast = sum(1 for i in rows if records.code[i] in _REJECT and records.latency[i] < FAST_REJECT_S)
    p50, p99 = _pct(admitted, 0.50), _pct(admitted, 0.99)
    return {
        "arrivals": n,
        "offered_per_s": n / seconds,
        "goodput_per_s": good / seconds,
        "good_share": good / n if n else 0.0,
        "admitted": len(admitted),
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "rejected_fast_share": fast / n if n else 0.0,
        "deadline_share": codes[_DEADLINE] / n if n else 0.0,
        "statuses": {_NAMES.get(code, str(code)): count for code, count in sorted(codes.items())},
    }


def class_success(records: Records, rows: list[int]) -> dict[str, Any]:
    """Per criticality class: arrivals and the share OK within the deadline."""
    out: dict[str, Any] = {}
    for klass, name in enumerate(CLASSES):
        mine = [i for i in rows if records.klass[i] == klass]
        if mine:
            good = sum(1 for i in mine if _good(records.code[i], records.latency[i]))
            out[name] = {"arrivals": len(mine), "success": good / len(mine)}
    return out


def recovery_seconds(records: Records, rows: list[int], drop: float, end: float) -> tuple[float | None, float | None]:
    """Seconds from ``drop`` to the first 250 ms window of sends ≥ 95 % OK within the deadline, and to the
    window from which every later one in the step is (``None``: never)."""
    sends = sorted((records.sent_at[i], _good(records.code[i], records.latency[i])) for i in rows)
    times = [t for t, _ in sends]
    windows: list[tuple[float, bool | None]] = []  # None: no sends in the window (a Poisson lull says nothing)
    start = drop
    while start + WINDOW_S <= end + 1e-9:
        lo, hi = bisect.bisect_left(times, start), bisect.bisect_left(times, start + WINDOW_S)
        ok = None if hi == lo else sum(good for _, good in sends[lo:hi]) >= GOOD_SHARE * (hi - lo)
        windows.append((start - drop, ok))
        start += WINDOW_SLIDE_S
    first = next((round(t, 3) for t, ok in windows if ok), None)
    bad = [i for i, (_, ok) in enumerate(windows) if ok is False]
    stable = 0.0 if not bad else (round(windows[bad[-1] + 1][0], 3) if bad[-1] + 1 < len(windows) else None)
    return first, stable


def timeline(records: Records, begin: float, end: float) -> list[dict[str, float]]:
    """Per 250 ms from ``begin``: arrivals (by send time) and goodput (by answer time), per second."""
    buckets = int((end + DEADLINE_S - begin) / TIMELINE_BUCKET_S) + 1
    sent, good = [0] * buckets, [0] * buckets
    for i in range(len(records.code)):
        if records.step[i] >= len(STEPS):  # warmup calls are not reported
            continue
        b = int((records.sent_at[i] - begin) / TIMELINE_BUCKET_S)
        if 0 <= b < buckets:
            sent[b] += 1
        if _good(records.code[i], records.latency[i]):
            b = int((records.sent_at[i] + records.latency[i] - begin) / TIMELINE_BUCKET_S)
            if 0 <= b < buckets:
                good[b] += 1
    return [
        {"t": round(b * TIMELINE_BUCKET_S, 2), "offered_per_s": sent[b] / TIMELINE_BUCKET_S,
         "goodput_per_s": good[b] / TIMELINE_BUCKET_S}
        for b in range(buckets)
    ]  # fmt: skip


def server_metrics(ledger: dict[str, Any], index: int, sampler: CpuSampler, begin: float, seconds: float,
                   ) -> dict[str, Any]:  # fmt: skip
    """Server-side figures of one step: process CPU over its time, handler CPU charged to its calls."""
    row = ledger.get(str(index), {})
    handler = row.get("cpu_s", 0.0)
    missed = row.get("missed_cpu_s", 0.0)
    return {
        "server_cores": sampler.server.cores(begin, seconds),
        "machine_cores": sampler.machine.cores(begin, seconds),
        "handled": row.get("calls", 0),
        "handler_cpu_s": handler,
        "missed_calls": row.get("missed_calls", 0),
        "missed_cpu_s": missed,
        "missed_cpu_share": missed / handler if handler else 0.0,
        "expired_at_start": row.get("expired_at_start", 0),
        "handler_ms_per_call": handler * 1000 / row["calls"] if row.get("calls") else None,
    }


def analyse(load: dict[str, Any], ledger: dict[str, Any], sampler: CpuSampler, step_s: float) -> dict[str, Any]:
    """Every step's client and server figures, recovery, criticality and the timeline of one stack."""
    records = decode_records(load["records"])
    starts: list[float] = load["step_starts"]
    by_step: dict[int, list[int]] = {}
    for i, step in enumerate(records.step):
        by_step.setdefault(step, []).append(i)
    steps = []
    for index, (spec, begin) in enumerate(zip(STEPS, starts, strict=True)):
        rows = by_step.get(index, [])
        steps.append({"label": spec.label, "load": spec.load, "mixed": spec.mixed,
                      "generator_lag_ms": load["step_lag_s"][index] * 1000,
                      **step_metrics(records, rows, step_s),
                      **server_metrics(ledger, index, sampler, begin, step_s)})  # fmt: skip
    drop = starts[RECOVERY_STEP]
    recovery, stable = recovery_seconds(records, by_step.get(RECOVERY_STEP, []), drop, drop + step_s)
    return {
        "steps": steps,
        "step_offsets_s": [t - starts[0] for t in starts],
        "recovery_s": recovery,
        "stable_recovery_s": stable,
        "mixed_classes": class_success(records, by_step.get(MIXED_STEP, [])),
        "timeline": timeline(records, starts[0], load["end"]),
        "client": {
            k: load[k] for k in ("sent", "capped", "unfinished", "peak_outstanding", "max_lag_s", "client_cpu_s")
        },  # fmt: skip
    }


def checks(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 12's acceptance figures for one stack (pass/fail each)."""
    steps = result["steps"][: len(LOAD_STEPS)]
    peak = max(s["goodput_per_s"] for s in steps)
    unloaded_p99 = steps[0]["p99_ms"]
    out: dict[str, Any] = {"peak_goodput_per_s": peak, "unloaded_p99_ms": unloaded_p99}
    for step in steps:
        if step["load"] >= 3:
            keep = step["goodput_per_s"] / peak if peak else 0.0
            ratio = step["p99_ms"] / unloaded_p99 if step["p99_ms"] and unloaded_p99 else None
            out[f"goodput_kept_{step['label']}"] = {"value": keep, "ok": keep >= KEEP_GOODPUT}
            out[f"p99_ratio_{step['label']}"] = {"value": ratio, "ok": ratio is not None and ratio <= P99_FACTOR}
    recovery = result["recovery_s"]
    out["recovery_s"] = {"value": recovery, "ok": recovery is not None and recovery <= RECOVER_WITHIN}
    critical = result["mixed_classes"].get("CRITICAL", {}).get("success")
    out["critical_success"] = {"value": critical, "ok": critical is not None and critical >= CRITICAL_OK}
    out["all_ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


# -- one front -----------------------------------------------------------------------------


def probe(target: str, settings: Settings) -> dict[str, Any]:
    """Closed-loop capacity of the server at ``target``."""
    plan = {"target": target, "connections": min(settings.connections, PROBE_CONCURRENCY),
            "probe": {"concurrency": PROBE_CONCURRENCY, "warmup": 0.5, "seconds": settings.probe_s},
        "tag": PROBE_TAG}  # fmt: skip
    return run_loadgen(plan, settings.probe_s + 0.5 + LOADGEN_STARTUP_S)


def load_plan(target: str, capacity: float, settings: Settings) -> dict[str, Any]:
    """The open-loop plan: every step at its multiple of ``capacity``."""
    return {
        "target": target,
        "connections": settings.connections,
        "deadline": DEADLINE_S,
        "max_outstanding": MAX_OUTSTANDING,
        "seed": 12,
        "warmup": {"rate": LOAD_STEPS[0] * capacity, "seconds": settings.warmup_s, "tag": WARMUP_TAG},
        "steps": [
            {"rate": s.load * capacity, "seconds": settings.step_s, "mixed": s.mixed, "gap_before": s.gap_before}
            for s in STEPS
        ],
    }


def run_stack(stack: str, front: str, capacity: float | None, settings: Settings) -> dict[str, Any]:
    """Start the stack's server, probe it, load it (at the reference ``capacity``, or its own), stop it."""
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp, tempfile.TemporaryFile("w+") as log:
        server = ServerProcess(stack, front, settings.iterations, Path(tmp) / "stats.json", log, settings.accept_queue)
        sampler: CpuSampler | None = None
        try:
            probed = probe(server.target, settings)
            rate = capacity or settings.capacity or probed["rate"]
            if rate <= 0:
                raise RuntimeError(f"{server.name}: the capacity probe saw no OK call ({probed})")
            print(f"  {stack}/{front}: probe {probed['rate']:.0f} OK calls/s, offering multiples of {rate:.0f}/s",
                  flush=True)  # fmt: skip
            sampler = CpuSampler(server.pid)
            plan = load_plan(server.target, rate, settings)
            length = settings.warmup_s + sum(settings.step_s + s.gap_before for s in STEPS) + DEADLINE_S + 5
            load = run_loadgen(plan, length + LOADGEN_STARTUP_S)
        finally:
            if sampler is not None:
                sampler.stop()
            ledger = server.stop()
        if server.proc.returncode not in (0, None):
            print(f"warning: {server.name} exited with {server.proc.returncode}: {server.log_tail()}",
                  file=sys.stderr)  # fmt: skip
    assert sampler is not None
    result = analyse(load, ledger, sampler, settings.step_s)
    return {"probe": probed, "capacity_used": rate, **result, "checks": checks(result)}


def reference_stack(stacks: Sequence[str]) -> str:
    """The stack whose probed capacity sets everyone's offered rates: raw, else rpcframe-off, else the first."""
    for name in ("raw", "rpcframe-off"):
        if name in stacks:
            return name
    return stacks[0]


def run_front(front: str, settings: Settings) -> dict[str, Any]:
    """Every stack of one front; the reference stack first, its capacity shared with the others."""
    reference = reference_stack(settings.stacks)
    order = [reference, *(s for s in settings.stacks if s != reference)]
    results: dict[str, Any] = {}
    capacity: float | None = settings.capacity
    for stack in order:
        results[stack] = run_stack(stack, front, capacity, settings)
        capacity = capacity or results[stack]["capacity_used"]
        print_stack(stack, front, results[stack])
    return {"reference": reference, "capacity_per_s": capacity, "stacks": {s: results[s] for s in settings.stacks}}


def print_stack(stack: str, front: str, result: dict[str, Any]) -> None:
    """One line per step on stdout, as the run goes."""
    for s in result["steps"]:
        print(f"  {stack:<12} {front:<4} {s['label']:<14} offered {s['offered_per_s']:>6.0f}/s  "
              f"goodput {s['goodput_per_s']:>6.0f}/s  p50 {_ms(s['p50_ms']):>8}  p99 {_ms(s['p99_ms']):>8}  "
              f"fast-rejected {s['rejected_fast_share']:>4.0%}  deadline {s['deadline_share']:>4.0%}  "
              f"server {s['server_cores']:.2f} cores, {s['missed_cpu_share']:.0%} of handler CPU missed",
              flush=True)  # fmt: skip
    classes = ", ".join(f"{k} {v['success']:.1%}" for k, v in result["mixed_classes"].items())
    print(f"  {stack:<12} {front:<4} recovery {_s(result['recovery_s'])} (stable {_s(result['stable_recovery_s'])}); "
          f"mixed 3×: {classes}", flush=True)  # fmt: skip


# -- report --------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def _s(value: float | None) -> str:
    return "not within the step" if value is None else f"{value:.2f} s"


def _pc(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _mark(check: dict[str, Any]) -> str:
    return "pass" if check["ok"] else "FAIL"


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown report."""
    s, m = doc["settings"], doc["machine"]
    lines = [
        "# Overload: goodput under 0.5×–5× offered load",
        "",
        f"Run {doc['started_at']} ({'quick' if s['quick'] else 'full'}): {s['step_s']:g} s per step, capacity "
        f"probe {s['probe_s']:g} s. {m['cpus']} CPUs, Python {m['python']}, grpcio {m['grpcio']}. Handler: "
        f"{s['iterations']} rounds of a pure-Python loop (calibrated to {WORK_S * 1000:g} ms CPU), one server "
        f"process; every call has a {DEADLINE_S * 1000:g} ms deadline; open-loop Poisson arrivals from one raw "
        f"grpc.aio client process over {s['connections']} connections (at most {MAX_OUTSTANDING} outstanding).",
        "",
        "Goodput = calls answered OK within their deadline, per second of the step. p50/p99 are of admitted "
        "calls (answered OK), from the intended send time. Fast-rejected = RESOURCE_EXHAUSTED, UNAVAILABLE or "
        f"CANCELLED within {FAST_REJECT_S * 1000:g} ms. Missed CPU = handler CPU of calls whose deadline had passed "
        "when their work ended (the server times each handler with thread_time). Recovery = seconds from the drop "
        f"back to {RECOVERY_LOAD:g}× until a {WINDOW_S * 1000:g} ms window of sends is ≥ {GOOD_SHARE:.0%} OK "
        "within the deadline (windows slide by 50 ms); *stable* = from when every later window of the step is. "
        f"The mixed step follows a {STEPS[MIXED_STEP].gap_before:g} s pause, so no recovery-step call waits "
        "behind its load.",
        "",
    ]
    if not doc["overload_supported"]:
        lines += ["**Note:** this rpcframe has no `ServerConfig.overload` yet, so `rpcframe-off` and "
                  "`rpcframe` run the same configuration.", ""]  # fmt: skip
    for front, fr in doc["fronts"].items():
        lines += _front_section(front, fr)
    lines += ["Plot: `overload.png` (goodput vs offered load; goodput over time).", ""]
    return "\n".join(lines)


def _front_section(front: str, fr: dict[str, Any]) -> list[str]:
    probes = ", ".join(f"{k} {v['probe']['rate']:.0f}/s" for k, v in fr["stacks"].items())
    lines = [
        f"## {front} server",
        "",
        f"Capacity (closed-loop probe, OK calls/s): {probes}. Offered rates are multiples of "
        f"{fr['capacity_per_s']:.0f}/s ({fr['reference']}).",
        "",
        "| stack | step | offered/s | goodput/s | p50 | p99 | fast-rejected | deadline exceeded | server cores "
        "| missed CPU (s, share) | handler ms/call | machine busy cores | generator lag |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stack, r in fr["stacks"].items():
        for st in r["steps"]:
            lag = st["generator_lag_ms"]
            lines.append(
                f"| {stack} | {st['label']} | {st['offered_per_s']:.0f} | {st['goodput_per_s']:.0f} "
                f"| {_ms(st['p50_ms'])} | {_ms(st['p99_ms'])} | {st['rejected_fast_share']:.1%} "
                f"| {st['deadline_share']:.1%} | {st['server_cores']:.2f} "
                f"| {st['missed_cpu_s']:.2f} s, {st['missed_cpu_share']:.0%} "
                f"| {_ms(st['handler_ms_per_call'])} | {st['machine_cores']:.2f} "
                f"| {lag:.0f} ms{' †' if lag > LAG_WARN_MS else ''} |")  # fmt: skip
    lines += ["", *_checks_table(fr), ""]
    notes = [f"{stack}: {r['client']['capped']} arrivals not sent (outstanding cap {MAX_OUTSTANDING} hit)"
             for stack, r in fr["stacks"].items() if r["client"]["capped"]]  # fmt: skip
    peaks = ", ".join(f"{k} {v['client']['peak_outstanding']}" for k, v in fr["stacks"].items())
    lines += [
        f"Machine busy cores: all processes, from /proc/stat (the server and load generator use up to about 2 of "
        f"them; more means neighbours took CPU). Generator lag: the longest a send came after its scheduled time "
        f"in the step; † marks steps over {LAG_WARN_MS} ms, where the load generator itself was short of CPU and "
        f"the step's figures are suspect. Peak outstanding calls: {peaks}. " + "; ".join(notes),
        "",
    ]
    return lines


def _checks_table(fr: dict[str, Any]) -> list[str]:
    lines = [
        f"Acceptance (issue 12, for `rpcframe` with defaults): at 3× and 5× goodput ≥ {KEEP_GOODPUT:.0%} of peak "
        f"and p99 ≤ {P99_FACTOR:g}× the 0.5× p99; recovery ≤ {RECOVER_WITHIN:g} s; ≥ {CRITICAL_OK:.0%} of "
        "CRITICAL calls OK at 3× mixed. Other stacks shown for comparison.",
        "",
        "| stack | peak goodput/s | kept at 3× | kept at 5× | p99 ratio 3× | p99 ratio 5× | recovery | CRITICAL OK "
        "| SHEDDABLE OK | all |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stack, r in fr["stacks"].items():
        c, mixed = r["checks"], r["mixed_classes"]

        def cell(key: str, fmt: str, c: dict[str, Any] = c) -> str:
            v = c[key]["value"]
            return f"{'–' if v is None else format(v, fmt)} ({_mark(c[key])})"

        lines.append(
            f"| {stack} | {c['peak_goodput_per_s']:.0f} | {cell('goodput_kept_3×', '.0%')} "
            f"| {cell('goodput_kept_5×', '.0%')} | {cell('p99_ratio_3×', '.2f')} | {cell('p99_ratio_5×', '.2f')} "
            f"| {_s(c['recovery_s']['value'])} ({_mark(c['recovery_s'])}; stable {_s(r['stable_recovery_s'])}) "
            f"| {cell('critical_success', '.1%')} "
            f"| {_pc(mixed.get('SHEDDABLE', {}).get('success'))} | {'pass' if c['all_ok'] else 'FAIL'} |")  # fmt: skip
    return lines


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Per front: goodput vs offered load (one line per stack) and goodput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fronts = list(doc["fronts"].items())
    fig, axes = plt.subplots(len(fronts), 2, figsize=(14, 4.5 * len(fronts)), squeeze=False)
    for (front, fr), (left, right) in zip(fronts, axes, strict=True):
        capacity = fr["capacity_per_s"]
        top = max(LOAD_STEPS) * capacity
        left.plot([0, capacity, top], [0, capacity, capacity], "k:", linewidth=1, label="ideal (capacity)")
        for stack, r in fr["stacks"].items():
            steps = r["steps"][: len(LOAD_STEPS)]
            left.plot([s["offered_per_s"] for s in steps], [s["goodput_per_s"] for s in steps], "o-", label=stack)
            right.plot([p["t"] for p in r["timeline"]], [p["goodput_per_s"] for p in r["timeline"]], label=stack,
                       linewidth=1)  # fmt: skip
        left.set(title=f"{front}: goodput vs offered load", xlabel="offered calls/s",
                 ylabel="OK within 500 ms deadline, /s")  # fmt: skip
        right.set(title=f"{front}: over time (steps: {', '.join(s.label for s in STEPS)})",
                  xlabel="s since the first step",
                  ylabel="answered OK within deadline /s (250 ms buckets)")  # fmt: skip
        for offset in next(iter(fr["stacks"].values()))["step_offsets_s"][1:]:
            right.axvline(offset, color="grey", linewidth=0.5)
        for ax in (left, right):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- main ----------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "grpcio": grpc.__version__}  # fmt: skip


def parse_settings(argv: Sequence[str] | None) -> tuple[Settings, Path, bool]:
    """Command line -> settings, output directory, strict flag."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s steps, 3 s probe (about 2.5 min per front)")
    parser.add_argument("--front", default="both", choices=[*FRONTS, "both"], help="server front (default both)")
    parser.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated, of {', '.join(STACKS)}")
    parser.add_argument("--step-seconds", type=float, default=None, help="seconds per step (default 30, quick 5)")
    parser.add_argument("--capacity", type=float, default=None, help="calls/s to offer multiples of (no probe)")
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help="client connections (default 64)")
    parser.add_argument("--accept-queue", type=int, default=ACCEPT_QUEUE,
                        help=f"accept_queue of the rpcframe-queue stack (default {ACCEPT_QUEUE})")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR", help="default benchmarks/results")
    parser.add_argument("--strict", action="store_true", help="exit 1 when rpcframe fails an acceptance check")
    args = parser.parse_args(argv)
    stacks = tuple(s for s in args.stacks.split(",") if s)
    if not stacks or any(s not in STACKS for s in stacks) or len(set(stacks)) != len(stacks):
        parser.error(f"--stacks: distinct names of {', '.join(STACKS)}, got {args.stacks!r}")
    step_s = args.step_seconds or (5.0 if args.quick else 30.0)
    if not 1 <= step_s <= 120 or not 1 <= args.connections <= 256 or (args.capacity is not None and
                                                                      args.capacity <= 0):  # fmt: skip
        parser.error("--step-seconds in [1, 120], --connections in [1, 256], --capacity > 0")
    fronts = FRONTS if args.front == "both" else (args.front,)
    iterations = calibrate(WORK_S)
    probe_s, warmup_s = (3.0, 1.0) if args.quick else (5.0, 3.0)
    settings = Settings(args.quick, step_s, probe_s, warmup_s, fronts, stacks, args.connections, args.capacity,
                        iterations, args.accept_queue)  # fmt: skip
    return settings, args.out, args.strict


def main(argv: Sequence[str] | None = None) -> int:
    """Run every front and stack, write the report, the JSON and the plot."""
    settings, out, strict = parse_settings(argv)
    started = time.time()
    print(
        f"overload: fronts {', '.join(settings.fronts)}; stacks {', '.join(settings.stacks)}; "
        f"{len(STEPS)} steps of {settings.step_s:g} s; {settings.iterations} loop rounds per call",
        flush=True,
    )
    fronts = {front: run_front(front, settings) for front in settings.fronts}
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "started_at": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "settings": {
            **settings.__dict__,
            "deadline_s": DEADLINE_S,
            "work_s": WORK_S,
            "steps": [s.__dict__ for s in STEPS],
        },  # fmt: skip
        "machine": _machine(),
        "overload_supported": overload_supported(),
        "fronts": fronts,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "overload.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    report = markdown(doc)
    (out / "overload.md").write_text(report, encoding="utf-8")
    plot(doc, out / "overload.png")
    print(f"\nwrote {out / 'overload.md'}, overload.json and overload.png in {doc['duration_s']:.0f} s")
    failed = [f"{f}/rpcframe" for f, fr in fronts.items()
              if "rpcframe" in fr["stacks"] and not fr["stacks"]["rpcframe"]["checks"]["all_ok"]]  # fmt: skip
    if failed:
        print(f"acceptance not met: {', '.join(failed)}")
    return 1 if strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
