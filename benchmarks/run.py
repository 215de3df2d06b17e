"""Raw grpcio vs rpcframe, side by side in one run.

::

    python -m benchmarks.run            # full: 5 rounds of 4 s per scenario and stack (~8 min)
    python -m benchmarks.run --quick    # 3 rounds of 1 s (~1.5 min on 2 cores)
    python -m benchmarks.run --only 3backends --out /tmp/bench   # one scenario, results elsewhere

Every scenario runs the same load against two stacks: a server and client
written against grpcio alone ("raw") and the same servicer served and called
through rpcframe. Servers run in their own processes
(``python -m examples.bench_server``, started and stopped by PID, on
127.0.0.1 port 0), and every run's load generator is a fresh process too
(``rpcframe.bench`` with ``isolate=True``), so neither side shares a GIL or
an event loop with the other.

Each round runs every scenario once per stack, alternating which stack goes
first, so drift (thermal, noisy neighbours) hits both alike. Reported per
scenario and stack: median and min–max over rounds of throughput, latency
p50/p99, and CPU µs per call (or per message for streams) of the server
(user+sys from ``/proc/PID/stat`` over exactly the measured phase) and of
the load generator (``os.times`` in its process). CPU per call is the
number to watch: QPS from a saturated Python client scatters 10–40% from
run to run, CPU per call much less.

One scenario measures client-side balancing rather than the stack:
``aio-unary-64-3backends`` runs one rpcframe asyncio server process listening
on 3 ports; the raw side calls it through one grpc.aio channel to one of the
addresses, the rpcframe side through an rpcframe.aio channel to all three
(``a:1,b:2,c:3``: default ``filtered_p2c`` policy, health checking on). Same
server process, same load, so the difference is the balancing client's cost.

Results go to ``benchmarks/results/`` (``--out DIR`` for another directory):
``latest.json``, ``latest.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from generated.rpcframe.bench.v1 import bench_pb2
from rpcframe.bench import LoadSpec, MethodInfo, resolve_method, run_bench
from rpcframe.bench.cpu import process_cpu_seconds
from rpcframe.bench.histogram import new_histogram, percentiles
from rpcframe.bench.plot import plot_percentile_curves

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1
SERVICE = "rpcframe.bench.v1.BenchService"
STREAM_LENGTH = 500  # 1 KiB responses per server-stream call: ~50 ms per call at ~10k msg/s
# Bounds on every load loop besides its measured time.
MAX_CALLS_PER_RUN = 5_000_000
CALL_TIMEOUT = 10.0
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 15.0


# -- what runs -------------------------------------------------------------------


@dataclass(frozen=True)
class ServerKind:
    """One server process: which stack, front and event loop."""

    stack: str  # "raw" | "rpcframe"
    mode: str  # "sync" | "aio"
    uvloop: bool = False
    ports: int = 1  # addresses the one process listens on

    @property
    def name(self) -> str:
        """Short label, e.g. ``rpcframe-aio-uvloop`` or ``rpcframe-aio-asyncio-3ports``."""
        loop = ("-uvloop" if self.uvloop else "-asyncio") if self.mode == "aio" else ""
        ports = f"-{self.ports}ports" if self.ports > 1 else ""
        return f"{self.stack}-{self.mode}{loop}{ports}"

    def argv(self) -> list[str]:
        """The command that starts it."""
        args = [sys.executable, "-m", "examples.bench_server", f"--{self.stack}", f"--{self.mode}"]
        if self.mode == "aio":
            args.append("--uvloop" if self.uvloop else "--no-uvloop")
        if self.ports > 1:
            args += ["--ports", str(self.ports)]
        return [*args, "--bind", "127.0.0.1:0", "--workers", "16", "--grace", "2"]


@dataclass(frozen=True)
class Side:
    """One stack of a scenario: its server and the load generator's client."""

    label: str  # "raw" | "rpcframe"
    server: ServerKind
    client: str  # "raw" | "rpcframe"
    uvloop: bool = False  # client loop in aio mode
    endpoints: int = 1  # the client's target lists this many of the server's addresses (``a:1,b:2,c:3``)


@dataclass(frozen=True)
class Scenario:
    """A load, run against both stacks."""

    name: str
    title: str
    method: str
    request: bench_pb2.BenchRequest
    mode: str
    concurrency: int
    raw: Side
    rpcframe: Side
    per: str = "call"  # the unit throughput and CPU are counted in: "call" | "message"

    def sides(self, round_index: int) -> tuple[Side, Side]:
        """Both sides, raw first in even rounds and rpcframe first in odd ones."""
        return (self.raw, self.rpcframe) if round_index % 2 == 0 else (self.rpcframe, self.raw)


RAW_SYNC = ServerKind("raw", "sync")
RF_SYNC = ServerKind("rpcframe", "sync")
RAW_AIO = ServerKind("raw", "aio", uvloop=False)
RF_AIO = ServerKind("rpcframe", "aio", uvloop=False)
RF_AIO_UVLOOP = ServerKind("rpcframe", "aio", uvloop=True)
# One process on 3 ports: rpcframe's server, so the balancing client's health Watch streams get answers.
RF_AIO_3PORTS = ServerKind("rpcframe", "aio", uvloop=False, ports=3)

_UNARY_64 = bench_pb2.BenchRequest(payload=bytes(64), response_size=64)
_STREAM_1K = bench_pb2.BenchRequest(response_size=1024, count=STREAM_LENGTH)


def _sync_pair() -> tuple[Side, Side]:
    return Side("raw", RAW_SYNC, "raw"), Side("rpcframe", RF_SYNC, "rpcframe")


def _aio_pair() -> tuple[Side, Side]:
    # Like for like: both on the default asyncio loop, so the ratio is rpcframe's own cost.
    return Side("raw", RAW_AIO, "raw"), Side("rpcframe", RF_AIO, "rpcframe")


SCENARIOS = [
    Scenario("sync-unary-1", "sync unary 64 B, 1 caller", "Unary", _UNARY_64, "sync", 1, *_sync_pair()),
    Scenario("sync-unary-16", "sync unary 64 B, 16 callers", "Unary", _UNARY_64, "sync", 16, *_sync_pair()),
    Scenario(
        "sync-stream-1k",
        "sync server-stream 1 KiB messages",
        "ServerStream",
        _STREAM_1K,
        "sync",
        1,
        *_sync_pair(),
        per="message",
    ),  # fmt: skip
    Scenario("aio-unary-1", "aio unary 64 B, 1 in flight", "Unary", _UNARY_64, "aio", 1, *_aio_pair()),
    Scenario("aio-unary-64", "aio unary 64 B, 64 in flight", "Unary", _UNARY_64, "aio", 64, *_aio_pair()),
    Scenario(
        "aio-stream-1k",
        "aio server-stream 1 KiB messages",
        "ServerStream",
        _STREAM_1K,
        "aio",
        1,
        *_aio_pair(),
        per="message",
    ),  # fmt: skip
    Scenario("aio-pingpong", "aio bidi ping-pong 64 B", "PingPong", _UNARY_64, "aio", 1, *_aio_pair()),
    Scenario(
        "defaults-aio-unary-64",
        "defaults: rpcframe aio on uvloop vs raw grpc.aio on asyncio, 64 in flight",
        "Unary",
        _UNARY_64,
        "aio",
        64,
        Side("raw", RAW_AIO, "raw"),
        Side("rpcframe", RF_AIO_UVLOOP, "rpcframe", uvloop=True),
    ),  # fmt: skip
    Scenario(
        "aio-unary-64-3backends",
        "aio unary 64 B, 64 in flight, rpcframe over 3 endpoints vs raw 1 channel",
        "Unary",
        _UNARY_64,
        "aio",
        64,
        # The same server process for both sides; both clients on the default asyncio loop.
        Side("raw", RF_AIO_3PORTS, "raw"),
        Side("rpcframe", RF_AIO_3PORTS, "rpcframe", endpoints=3),
    ),  # fmt: skip
]


# -- server processes ------------------------------------------------------------


class ServerProcess:
    """A bench server in its own process, known by PID."""

    def __init__(self, kind: ServerKind, log: IO[str]) -> None:
        self.kind = kind
        self._log = log
        self.proc = subprocess.Popen(kind.argv(), cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        self.pid = self.proc.pid
        self.target = ""
        self.targets: list[str] = []  # every address, in bind order; ``target`` is the first

    def wait_ready(self) -> None:
        """Read one ``serving on HOST:PORT`` line per port (bounded)."""
        lines: list[str] = []
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def read() -> None:
            for _ in range(self.kind.ports):
                lines.append(stdout.readline())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(SERVER_START_TIMEOUT)
        matches = [re.fullmatch(r"serving on (\S+:\d+)\n", line) for line in list(lines)]
        if len(matches) < self.kind.ports or not all(matches):
            raise RuntimeError(f"{self.kind.name} server did not start: {lines} {self._stderr_tail()}")
        self.targets = [m.group(1) for m in matches if m is not None]
        self.target = self.targets[0]

    def target_for(self, side: Side) -> str:
        """The client's target: the first ``side.endpoints`` addresses, comma-separated."""
        if side.endpoints > len(self.targets):
            raise RuntimeError(f"{side.label} wants {side.endpoints} endpoints, {self.kind.name} has {self.targets}")
        return ",".join(self.targets[: side.endpoints])

    def _stderr_tail(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-2000:]

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used."""
        return process_cpu_seconds(self.pid)

    def stop(self) -> int | None:
        """SIGTERM by PID, wait for the drain, SIGKILL if it does not come."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(SERVER_STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@contextmanager
def servers(kinds: Sequence[ServerKind]) -> Iterator[dict[ServerKind, ServerProcess]]:
    """Start every server (in parallel), yield them by kind, stop them all."""
    with ExitStack() as stack:
        started: dict[ServerKind, ServerProcess] = {}

        def stop_all() -> None:
            for server in started.values():
                code = server.stop()
                if code not in (0, None):
                    print(f"warning: {server.kind.name} exited with {code}: {server._stderr_tail()}", file=sys.stderr)

        stack.callback(stop_all)
        for kind in kinds:
            log = stack.enter_context(tempfile.TemporaryFile("w+", prefix=f"{kind.name}-"))
            started[kind] = ServerProcess(kind, log)
        for server in started.values():
            server.wait_ready()
        yield started


# -- one run -----------------------------------------------------------------------


@dataclass
class Run:
    """One measured run of one side of a scenario."""

    scenario: str
    side: str
    round: int
    calls: int
    messages: int
    errors: int
    elapsed_s: float
    throughput: float  # per second, in the scenario's unit
    p50_us: int
    p99_us: int
    server_cpu_us: float  # per unit
    client_cpu_us: float  # per unit
    server_cores: float
    client_cores: float
    histogram: Any = field(repr=False, default=None)

    def row(self) -> dict[str, Any]:
        """JSON form (no histogram)."""
        return {k: v for k, v in self.__dict__.items() if k != "histogram"}


def run_once(scenario: Scenario, side: Side, server: ServerProcess, method: MethodInfo, round_index: int,
             warmup: float, measure: float) -> Run:  # fmt: skip
    """One load-generator process against one server, CPU sampled over the measured phase only."""
    spec = LoadSpec(
        target=server.target_for(side),
        method=method,
        request=scenario.request.SerializeToString(),
        mode=scenario.mode,  # type: ignore[arg-type]
        client=side.client,  # type: ignore[arg-type]
        concurrency=scenario.concurrency,
        duration=measure,
        total=MAX_CALLS_PER_RUN,
        warmup=warmup,
        call_timeout=CALL_TIMEOUT,
        uvloop=side.uvloop,
    )
    samples: dict[str, float] = {}

    def start() -> None:
        samples["cpu0"], samples["t0"] = server.cpu_seconds(), time.perf_counter()

    def end() -> None:
        samples["cpu1"], samples["t1"] = server.cpu_seconds(), time.perf_counter()

    result = run_bench(spec, isolate=True, on_measure_start=start, on_measure_end=end)
    merged = result.merged
    units = merged.messages if scenario.per == "message" else result.calls
    server_cpu = samples["cpu1"] - samples["cpu0"]
    wall = samples["t1"] - samples["t0"]
    stats = percentiles(merged.histogram)
    return Run(
        scenario=scenario.name,
        side=side.label,
        round=round_index,
        calls=result.calls,
        messages=merged.messages,
        errors=merged.failed,
        elapsed_s=round(merged.elapsed, 4),
        throughput=round(units / merged.elapsed, 1) if merged.elapsed else 0.0,
        p50_us=int(stats["p50"]),
        p99_us=int(stats["p99"]),
        server_cpu_us=round(server_cpu * 1e6 / units, 1) if units else 0.0,
        client_cpu_us=round(result.cpu_seconds * 1e6 / units, 1) if units else 0.0,
        server_cores=round(server_cpu / wall, 3) if wall > 0 else 0.0,
        client_cores=round(result.cpu_seconds / merged.elapsed, 3) if merged.elapsed else 0.0,
        histogram=merged.histogram,
    )


# -- summaries ---------------------------------------------------------------------

METRICS = ("throughput", "p50_us", "p99_us", "server_cpu_us", "client_cpu_us")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(scenario: Scenario, runs: list[Run]) -> dict[str, Any]:
    """Per side: median [min–max] of every metric; ratios rpcframe/raw of the medians."""
    sides: dict[str, Any] = {}
    for label in ("raw", "rpcframe"):
        mine = [r for r in runs if r.side == label]
        sides[label] = {m: spread([getattr(r, m) for r in mine]) for m in METRICS}
        sides[label]["errors"] = sum(r.errors for r in mine)
    ratios = {
        m: round(sides["rpcframe"][m]["median"] / sides["raw"][m]["median"], 3) if sides["raw"][m]["median"] else None
        for m in METRICS
    }
    return {"sides": sides, "ratios": ratios}


def _fmt(value: float, metric: str) -> str:
    if metric == "throughput":
        return f"{value / 1000:.2f}k" if value >= 1000 else f"{value:.0f}"
    if metric in ("p50_us", "p99_us"):
        return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} µs"
    return f"{value:.0f}"


def _cell(stats: dict[str, float], metric: str) -> str:
    return f"{_fmt(stats['median'], metric)} [{_fmt(stats['min'], metric)}–{_fmt(stats['max'], metric)}]"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown report."""
    settings = doc["settings"]
    machine = doc["machine"]
    lines = [
        "# rpcframe vs raw grpcio",
        "",
        f"Run {doc['started_at']} ({'quick' if settings['quick'] else 'full'}): {settings['rounds']} rounds, "
        f"{settings['warmup_s']:g} s warmup + {settings['measure_s']:g} s measured per run, raw/rpcframe order "
        f"alternating per round. {machine['cpus']} CPUs, Python {machine['python']}, grpcio {machine['grpcio']}, "
        f"protobuf {machine['protobuf']}, uvloop {machine['uvloop']}.",
        "",
        "Server and load generator run in separate processes on 127.0.0.1. Values are median [min–max] over "
        "rounds; ratios are rpcframe/raw of the medians (throughput: higher is better; latency and CPU: lower is "
        "better). CPU is user+sys µs per call (per message for streams): server from /proc/PID/stat, load "
        "generator from os.times, both over the measured phase only. QPS of saturated Python clients scatters "
        "10–40% between runs; CPU per call is the steadier comparison.",
        "",
        "## Ratios (rpcframe / raw)",
        "",
        "| scenario | throughput | p50 | p99 | server CPU/unit | client CPU/unit |",
        "|---|---|---|---|---|---|",
    ]
    for s in doc["scenarios"]:
        r = s["ratios"]
        lines.append(f"| {s['title']} | {_ratio(r['throughput'])} | {_ratio(r['p50_us'])} | {_ratio(r['p99_us'])} "
                     f"| {_ratio(r['server_cpu_us'])} | {_ratio(r['client_cpu_us'])} |")  # fmt: skip
    lines += [
        "",
        "## Details",
        "",
        "| scenario | stack | throughput /s | p50 | p99 | server CPU µs/unit | client CPU µs/unit | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in doc["scenarios"]:
        for label in ("raw", "rpcframe"):
            side = s["sides"][label]
            cells = " | ".join(_cell(side[m], m) for m in METRICS)
            unit = "msg" if s["per"] == "message" else "call"
            lines.append(f"| {s['title']} ({unit}) | {s['stack_labels'][label]} | {cells} | {side['errors']} |")
    lines += ["", "## What limits streaming rate", "", streaming_paragraph(doc), ""]
    lines += ["Plots: `throughput.png`, `ratios.png`, `cpu.png`, `latency-<scenario>.png`.", ""]
    return "\n".join(lines)


def streaming_paragraph(doc: dict[str, Any]) -> str:
    """Facts on the streaming rate, with this run's per-message numbers."""
    measured = []
    for s in doc["scenarios"]:
        if s["per"] != "message":
            continue
        raw, rf = s["sides"]["raw"], s["sides"]["rpcframe"]
        server, client = raw["server_cpu_us"]["median"], raw["client_cpu_us"]["median"]
        measured.append(
            f"{s['title']}: raw {_fmt(raw['throughput']['median'], 'throughput')} msg/s with "
            f"{server:.0f} µs server + {client:.0f} µs client = {server + client:.0f} µs CPU per message, "
            f"rpcframe {_fmt(rf['throughput']['median'], 'throughput')} msg/s"
        )
    here = ("This run: " + "; ".join(measured) + ". ") if measured else ""
    return (
        "Each streamed message in grpcio is a separate trip between grpc's C core and Python: a completion-queue "
        "event, a thread or event-loop wake-up, and resuming the handler's generator (server) or the reader "
        "(client). Protobuf work is small next to that (building, serializing and parsing a 64-byte message "
        "takes about 1 µs). " + here +
        "Earlier measurements on the same class of machine (2 vCPU, grpcio 1.85) found 80–200 µs of CPU per "
        "message, server plus client; for example grpc.aio server-streaming 1 KiB messages at 10.5k msg/s with "
        "79 + 94 µs, where grpclib, a pure-Python HTTP/2 stack on asyncio, reached 39.6k msg/s with 15 + 25 µs "
        "(~3.8×); grpclib runs HTTP/2 in Python on the event loop, so no message crosses a C-core boundary. "
        "Consequences: a per-message hook in rpcframe has to stay within a few µs (about 4 µs) to be invisible; "
        "what lifts the rate with grpcio is fewer, larger messages (batch items into a repeated field so the "
        "fixed per-message cost is amortized), more streams spread over processes (one process is bound to one "
        "core by the GIL), or another transport such as grpclib for stream-heavy services."
    )  # fmt: skip


def plots(doc: dict[str, Any], runs: list[Run], out: Path = RESULTS) -> list[Path]:
    """Write the PNGs into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    scenarios = doc["scenarios"]
    names = [s["name"] for s in scenarios]
    x = list(range(len(names)))

    def bars(ax: Any, metric: str, title: str) -> None:
        width = 0.38
        for offset, label in ((-width / 2, "raw"), (width / 2, "rpcframe")):
            med = [s["sides"][label][metric]["median"] for s in scenarios]
            low = [m - s["sides"][label][metric]["min"] for m, s in zip(med, scenarios, strict=True)]
            high = [s["sides"][label][metric]["max"] - m for m, s in zip(med, scenarios, strict=True)]
            ax.bar([i + offset for i in x], med, width, yerr=[low, high], capsize=3, label=label)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()

    fig, ax = plt.subplots(figsize=(10, 5))
    bars(ax, "throughput", "throughput per second (calls, or messages for streams), median and min–max")
    ax.set_yscale("log")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8))
    bars(top, "server_cpu_us", "server CPU µs per call / message")
    bars(bottom, "client_cpu_us", "load generator CPU µs per call / message")
    fig.tight_layout()
    paths.append(out / "cpu.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.27
    for i, (metric, label) in enumerate((("throughput", "throughput"), ("server_cpu_us", "server CPU/unit"),
                                         ("client_cpu_us", "client CPU/unit"))):  # fmt: skip
        values = [s["ratios"][metric] or 0.0 for s in scenarios]
        ax.bar([j + (i - 1) * width for j in x], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_title("rpcframe / raw (medians)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "ratios.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    for s in scenarios:
        curves = []
        for label in ("raw", "rpcframe"):
            hist = new_histogram()
            for run in runs:
                if run.scenario == s["name"] and run.side == label and run.histogram is not None:
                    hist.add(run.histogram)
            curves.append((s["stack_labels"][label], hist))
        paths.append(plot_percentile_curves(curves, out / f"latency-{s['name']}.png",
                                            f"{s['title']}: latency per call, all rounds"))  # fmt: skip
    return paths


# -- main ----------------------------------------------------------------------------


def _stack_label(side: Side) -> str:
    server = side.server
    loop = f", {'uvloop' if side.uvloop else 'asyncio'}" if server.mode == "aio" else ""
    endpoints = f", {side.endpoints} endpoints" if side.endpoints > 1 else ""
    return f"{side.label} ({server.mode}{loop}{endpoints})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 s (about 1.5 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per scenario (default 5, quick 3)")
    parser.add_argument("--measure", type=float, default=None, help="measured seconds per run (default 4, quick 1)")
    parser.add_argument("--warmup", type=float, default=None, help="warmup seconds per run (default 1, quick 0.5)")
    parser.add_argument("--only", default=None, metavar="REGEX", help="run only scenarios whose name matches")
    parser.add_argument("--rewrite-md", action="store_true", help="only rewrite latest.md from latest.json")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help="where latest.json, latest.md and the plots go (default benchmarks/results)")  # fmt: skip
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.rewrite_md:
        doc = json.loads((out / "latest.json").read_text(encoding="utf-8"))
        (out / "latest.md").write_text(markdown(doc), encoding="utf-8")
        return 0
    rounds = args.rounds or (3 if args.quick else 5)
    measure = args.measure or (1.0 if args.quick else 4.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    scenarios = [s for s in SCENARIOS if args.only is None or re.search(args.only, s.name)]
    if not scenarios:
        parser.error(f"no scenario matches {args.only!r}")
    if rounds < 1 or measure <= 0 or warmup < 0:
        parser.error("--rounds must be >= 1, --measure > 0, --warmup >= 0")

    methods = {m: resolve_method(f"{SERVICE}/{m}", "unused:0") for m in {s.method for s in scenarios}}
    kinds = list(dict.fromkeys(side.server for s in scenarios for side in (s.raw, s.rpcframe)))
    started = time.time()
    total_runs = rounds * len(scenarios) * 2
    runs: list[Run] = []
    print(f"{len(scenarios)} scenarios x 2 stacks x {rounds} rounds = {total_runs} runs of "
          f"{warmup:g}+{measure:g} s; servers: {', '.join(k.name for k in kinds)}", flush=True)  # fmt: skip
    with servers(kinds) as running:
        for round_index in range(rounds):
            for scenario in scenarios:
                for side in scenario.sides(round_index):
                    run = run_once(scenario, side, running[side.server], methods[scenario.method], round_index,
                                   warmup, measure)  # fmt: skip
                    runs.append(run)
                    unit = "msg" if scenario.per == "message" else "call"
                    print(f"[{len(runs):>3}/{total_runs}] r{round_index} {scenario.name:<22} {side.label:<8} "
                          f"{run.throughput:>9,.0f} {unit}/s  p50 {_fmt(run.p50_us, 'p50_us'):>9}  "
                          f"p99 {_fmt(run.p99_us, 'p99_us'):>9}  server {run.server_cpu_us:>6.0f} µs/{unit}  "
                          f"client {run.client_cpu_us:>6.0f} µs/{unit}"
                          + (f"  errors {run.errors}" if run.errors else ""), flush=True)  # fmt: skip

    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "started_at": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "settings": {
            "quick": args.quick,
            "rounds": rounds,
            "warmup_s": warmup,
            "measure_s": measure,
            "stream_length": STREAM_LENGTH,
        },  # fmt: skip
        "machine": _machine(),
        "scenarios": [],
    }
    for scenario in scenarios:
        mine = [r for r in runs if r.scenario == scenario.name]
        doc["scenarios"].append({
            "name": scenario.name,
            "title": scenario.title,
            "method": scenario.method,
            "mode": scenario.mode,
            "concurrency": scenario.concurrency,
            "per": scenario.per,
            "stack_labels": {"raw": _stack_label(scenario.raw), "rpcframe": _stack_label(scenario.rpcframe)},
            "servers": {"raw": scenario.raw.server.name, "rpcframe": scenario.rpcframe.server.name},
            **summarize(scenario, mine),
            "runs": [r.row() for r in mine],
        })  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    report = markdown(doc)
    (out / "latest.md").write_text(report, encoding="utf-8")
    written = plots(doc, runs, out)
    print()
    print(report)
    print(f"wrote {out / 'latest.json'}, {out / 'latest.md'} and {len(written)} plots "
          f"in {doc['duration_s']:.0f} s")  # fmt: skip
    return 0


def _machine() -> dict[str, Any]:
    import google.protobuf
    import uvloop

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "uvloop": uvloop.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
