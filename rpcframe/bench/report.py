"""Reports of a load run: the summary table and the JSON document.

JSON document (``rpcframe bench --json FILE``), schema version 1. Times are
microseconds (``_us``) or seconds (``_s``); every key is always present.

::

    {
      "schema_version": 1,
      "tool": "rpcframe bench",
      "versions": {"rpcframe": str, "grpcio": str, "python": str},
      "started_at": str,            # ISO 8601, UTC
      "config": {
        "target": str, "method": str,   # "/pkg.Service/Method"
        "kind": str,                    # unary | server-stream | client-stream | bidi-stream
        "descriptors": str,             # stubs | reflection
        "mode": str,                    # sync | aio
        "client": str,                  # raw | rpcframe
        "loop": str | null,             # uvloop | asyncio (aio mode), null (sync)
        "load": str,                    # closed | open
        "concurrency": int, "rps": float | null,
        "duration_s": float | null, "total": int | null, "warmup_s": float,
        "connections": int, "procs": int,
        "request_bytes": int, "stream_messages": int, "call_timeout_s": float
      },
      "summary": {
        "calls": int, "ok": int, "errors": int,
        "messages": int,            # unary: calls; server-stream: responses;
                                    # client-stream: requests; bidi: round trips
        "elapsed_s": float,         # the measured phase
        "qps": float,               # calls (OK or not) per second
        "messages_per_s": float,
        "late_sends": int           # open loop: sends > 1 ms behind schedule
      },
      "latency_us": {               # OK calls; open loop: from the intended send time
        "count": int, "min": int, "mean": float,
        "p50": int, "p90": int, "p99": int, "p99.9": int, "max": int
      },
      "status": {"OK": int, "<STATUS NAME>": int, ...},
      "errors": {"<STATUS NAME>": str},      # first details seen per status
      "client_cpu": {                # the load generator's own CPU
        "user_s": float, "system_s": float,
        "us_per_call": float, "us_per_message": float,
        "cores": float              # CPU seconds / elapsed seconds
      },
      "timeline": [                 # one entry per second of the measured phase
        {"second": int, "width_s": float,   # 1, except for a last partial second
         "calls": int, "ok": int, "errors": int, "messages": int,
         "p50_us": int, "p99_us": int}
      ],
      "percentile_curve": [[float, int], ...],   # (percentile, latency µs)
      "histogram": str              # HDR histogram, compressed base64 (HdrHistogram.encode)
    }

Failed calls are counted in ``status`` and ``timeline`` but their latency is
not part of the histogram.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from .. import __version__
from .histogram import PERCENTILES, percentile_curve, percentiles
from .runner import BenchResult

__all__ = ["SCHEMA_VERSION", "print_summary", "summary_table", "to_document", "write_json"]

SCHEMA_VERSION = 1


def to_document(result: BenchResult) -> dict[str, Any]:
    """The JSON document of a run (schema in this module's docstring)."""
    spec, merged = result.spec, result.merged
    elapsed = merged.elapsed
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "rpcframe bench",
        "versions": {"rpcframe": __version__, "grpcio": grpc.__version__, "python": platform.python_version()},
        "started_at": datetime.datetime.fromtimestamp(result.started_at, datetime.UTC).isoformat(),
        "config": {
            "target": spec.target,
            "method": spec.method.path,
            "kind": spec.method.label,
            "descriptors": spec.method.source,
            "mode": spec.mode,
            "client": spec.client,
            "loop": ("uvloop" if spec.uvloop else "asyncio") if spec.mode == "aio" else None,
            "load": "open" if spec.open_loop else "closed",
            "concurrency": spec.concurrency,
            "rps": spec.rps,
            "duration_s": spec.duration,
            "total": spec.total,
            "warmup_s": spec.warmup,
            "connections": spec.connections,
            "procs": result.procs,
            "request_bytes": len(spec.request),
            "stream_messages": spec.stream_messages,
            "call_timeout_s": spec.call_timeout,
        },
        "summary": {
            "calls": result.calls,
            "ok": merged.ok,
            "errors": merged.failed,
            "messages": merged.messages,
            "elapsed_s": round(elapsed, 6),
            "qps": round(result.qps, 3),
            "messages_per_s": round(result.messages_per_s, 3),
            "late_sends": merged.late,
        },
        "latency_us": percentiles(merged.histogram),
        "status": result.status,
        "errors": dict(merged.error_samples),
        "client_cpu": {
            "user_s": round(merged.cpu_user, 6),
            "system_s": round(merged.cpu_system, 6),
            "us_per_call": round(result.cpu_us_per_call, 2),
            "us_per_message": round(result.cpu_us_per_message, 2),
            "cores": round(result.cpu_seconds / elapsed, 4) if elapsed > 0 else 0.0,
        },
        "timeline": [
            {
                "second": s.second,
                "width_s": round(s.width, 6),
                "calls": s.ok + s.failed,
                "ok": s.ok,
                "errors": s.failed,
                "messages": s.messages,
                "p50_us": s.p50_us,
                "p99_us": s.p99_us,
            }  # fmt: skip
            for s in merged.timeline
        ],
        "percentile_curve": [[p, v] for p, v in percentile_curve(merged.histogram)],
        "histogram": merged.histogram.encode().decode("ascii"),
    }


def write_json(result: BenchResult, path: str | Path) -> Path:
    """Write the JSON document to ``path``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_document(result), indent=2) + "\n", encoding="utf-8")
    return out


def format_us(us: float) -> str:
    """A latency in the unit that keeps it short (µs, ms or s)."""
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1_000_000:.2f} s"


def summary_table(result: BenchResult) -> Table:
    """The human summary: throughput, latency percentiles, statuses, CPU."""
    spec, merged = result.spec, result.merged
    load = f"open loop {spec.rps:g}/s, up to {spec.concurrency} in flight" if spec.open_loop else (
        f"closed loop, {spec.concurrency} caller{'s' if spec.concurrency != 1 else ''}")  # fmt: skip
    loop = f" on {'uvloop' if spec.uvloop else 'asyncio'}" if spec.mode == "aio" else ""
    title = f"{spec.method.path} @ {spec.target}"
    caption = (f"{spec.method.label}, {spec.client} client, {spec.mode}{loop}, {load}, "
               f"{spec.connections} conn, {result.procs} proc")  # fmt: skip
    table = Table(title=title, caption=caption, show_header=False, title_justify="left", caption_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    calls = f"{result.calls} in {merged.elapsed:.2f} s ({merged.ok} OK, {merged.failed} failed)"
    table.add_row("calls", calls)
    table.add_row("throughput", f"{result.qps:,.1f} calls/s")
    if spec.method.kind != "unary_unary":
        table.add_row("messages", f"{merged.messages} ({result.messages_per_s:,.1f}/s)")
    stats = percentiles(merged.histogram)
    if stats["count"]:
        table.add_row("latency", "  ".join(f"p{p:g} {format_us(stats[f'p{p:g}'])}" for p in PERCENTILES))
        table.add_row("", "  ".join(f"{k} {format_us(stats[k])}" for k in ("min", "mean", "max")))
    if spec.open_loop:
        table.add_row("late sends", f"{merged.late} (> 1 ms behind schedule)")
    table.add_row("status", ", ".join(f"{name} {n}" for name, n in result.status.items()) or "none")
    for name, details in merged.error_samples.items():
        table.add_row("", f"{name}: {details}")
    cores = result.cpu_seconds / merged.elapsed if merged.elapsed > 0 else 0.0
    table.add_row("generator CPU", f"{result.cpu_seconds:.2f} s ({cores:.2f} cores), "
                                   f"{result.cpu_us_per_call:.0f} µs/call")  # fmt: skip
    return table


def print_summary(result: BenchResult, console: Console | None = None) -> None:
    """Print :func:`summary_table` to ``console`` (stdout by default)."""
    (console or Console()).print(summary_table(result))
