"""Does opening and closing asyncio channels grow the client's memory, and whose is it?

::

    python -m benchmarks.churn                     # raw grpc.aio vs rpcframe.aio, 3 rounds of 1000 channels
    python -m benchmarks.churn --rounds 4 --per-round 2000
    python -m benchmarks.churn --trace             # plus the top Python-level growth (tracemalloc)

Each channel makes one unary call and is closed. One echo server runs in a
child process (stopped by PID); every client kind runs in its own fresh
process (``--client KIND``), so their RSS do not mix. Kinds:

- ``raw``: ``grpc.aio.insecure_channel`` + ``EchoServiceStub``;
- ``rpcframe``: ``rpcframe.aio.connect`` with its defaults (health watch on);
- ``rpcframe-nohealth``: ``ChannelConfig(health_check=False)``.

Reported per round: RSS (``/proc/self/statm``) after ``gc.collect()``, the
number of live asyncio tasks and of objects grpc.aio/rpcframe keep (by type
name). A leak grows every round; allocator high-water marks flatten out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from typing import Any

KINDS = ("raw", "rpcframe", "rpcframe-nohealth")
_WATCHED = ("Channel", "_Subchannel", "UnaryUnary", "EndpointStats", "Task", "Future", "Event")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live_objects() -> dict[str, int]:
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    return {name: counts[name] for name in _WATCHED if counts[name]}


async def _one_channel(kind: str, target: str) -> None:
    import grpc.aio

    import rpcframe
    import rpcframe.aio
    from generated.rpcframe.echo.v1 import echo_pb2, echo_pb2_grpc

    request = echo_pb2.EchoRequest(message="churn")
    if kind == "raw":
        async with grpc.aio.insecure_channel(target) as channel:
            await echo_pb2_grpc.EchoServiceStub(channel).Echo(request, timeout=5)
        return
    config = rpcframe.ChannelConfig(health_check=kind != "rpcframe-nohealth")
    async with rpcframe.aio.connect(target, config) as rf_channel:
        await rf_channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(request, timeout=5, wait_for_ready=True)


async def _client(kind: str, target: str, rounds: int, per_round: int, trace: bool) -> None:
    for _ in range(50):  # warm-up: imports, grpc's first-use allocations
        await _one_channel(kind, target)
    gc.collect()
    if trace:
        tracemalloc.start(10)
        first = tracemalloc.take_snapshot()
    rows: list[dict[str, Any]] = [{"channels": 0, "rss_mb": round(_rss_mb(), 1), "tasks": len(asyncio.all_tasks())}]
    started = time.monotonic()
    for r in range(1, rounds + 1):
        for _ in range(per_round):
            await _one_channel(kind, target)
        await asyncio.sleep(0.2)  # grpc.aio finishes closing channels on the loop
        gc.collect()
        row = {"channels": r * per_round, "rss_mb": round(_rss_mb(), 1), "tasks": len(asyncio.all_tasks())}
        rows.append({**row, "objects": _live_objects()})
    result: dict[str, Any] = {"kind": kind, "rows": rows, "seconds": round(time.monotonic() - started, 1)}
    if trace:
        top = tracemalloc.take_snapshot().compare_to(first, "traceback")[:8]
        result["growth"] = [
            {"kib": round(s.size_diff / 1024, 1), "count": s.count_diff, "at": s.traceback.format()[-4:]} for s in top
        ]
    print(json.dumps(result), flush=True)


def _serve() -> None:
    from benchmarks._children import serve_until_sigterm
    from examples.echo import AioEchoServicer

    asyncio.run(serve_until_sigterm([AioEchoServicer()]))


def main() -> None:
    """Run every client kind against one echo server and print RSS per round."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--trace", action="store_true", help="tracemalloc diff of the Python-level growth")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve()
        return
    if args.client:
        asyncio.run(_client(args.client, args.target, args.rounds, args.per_round, args.trace))
        return
    from benchmarks._children import REPO, ChildServers

    server = ChildServers(["-m", "benchmarks.churn", "--serve"], 1)
    try:
        for kind in args.kinds.split(","):
            argv = ["-m", "benchmarks.churn", "--client", kind, "--target", server.addresses[0]]
            argv += ["--rounds", str(args.rounds), "--per-round", str(args.per_round)] + ["--trace"] * args.trace
            out = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=900)
            if out.returncode:
                print(f"{kind}: failed\n{out.stderr[-2000:]}")
                continue
            _report(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        server.stop()


def _report(result: dict[str, Any]) -> None:
    print(f"{result['kind']} ({result['seconds']} s):")
    base = result["rows"][0]["rss_mb"]
    for row in result["rows"]:
        extra = f"  objects {row['objects']}" if "objects" in row else ""
        print(f"  {row['channels']:>6} channels  RSS {row['rss_mb']:7.1f} MB (+{row['rss_mb'] - base:5.1f})"
              f"  tasks {row['tasks']}{extra}")
    for g in result.get("growth", ()):
        print(f"    {g['kib']:9.1f} KiB {g['count']:+6d} blocks  {' | '.join(line.strip() for line in g['at'])}")


if __name__ == "__main__":
    main()
