"""`make demo`: call kinds, balancing and failover, deadlines, retries and hedging, traces and metrics, events.

Part 1 starts ``rpcframe serve examples.echo:aio_servicer`` on a free port,
runs the four call kinds through the sync and the asyncio client, checks
health, then sends SIGTERM and shows the server draining. Part 2 is
:mod:`examples.balancing_demo`, part 3 :mod:`examples.resilience_demo`, part 4
:mod:`examples.observability_demo`, part 5 :mod:`examples.events_demo` (skipped,
with a note, where nats-server is not installed).
Exits non-zero if anything fails.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

import rpcframe
import rpcframe.aio
from examples import balancing_demo, events_demo, observability_demo, resilience_demo
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc

Row = tuple[str, str, str, float]


def start_server() -> tuple[subprocess.Popen[str], str]:
    """Start the echo server process and wait for its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpcframe", "serve", "examples.echo:aio_servicer", "--bind", "127.0.0.1:0"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.fullmatch(r"serving on (\S+)\n", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server failed to start: {line!r}")
    return proc, match.group(1)


def timed(front: str, kind: str, fn: Callable[[], str]) -> Row:
    start = time.perf_counter()
    result = fn()
    return front, kind, result, (time.perf_counter() - start) * 1000


def sync_calls(target: str) -> list[Row]:
    with rpcframe.connect(target, rpcframe.ChannelConfig(default_timeout=5)) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)

        def unary() -> str:
            response, call = stub.Echo.with_call(pb.EchoRequest(message="hello"), metadata=(("x-demo", "sync"),))
            trailing = dict(call.trailing_metadata())
            return f"{response.message!r}, trailing x-demo={trailing.get('x-demo')!r}"

        def server_stream() -> str:
            return f"{len(list(stub.Expand(pb.ExpandRequest(message='tick', count=5))))} responses"

        def client_stream() -> str:
            r = stub.Collect(pb.EchoRequest(message=w) for w in ("a", "b", "c"))
            return f"count={r.count} message={r.message!r}"

        def bidi() -> str:
            return " ".join(r.message for r in stub.Chat(pb.EchoRequest(message=w) for w in ("ping", "pong")))

        return [timed("sync", k, f) for k, f in
                [("unary", unary), ("server stream", server_stream), ("client stream", client_stream),
                 ("bidi stream", bidi)]]  # fmt: skip


async def _words(*words: str) -> AsyncIterator[pb.EchoRequest]:
    for w in words:
        yield pb.EchoRequest(message=w)


async def aio_calls(target: str) -> list[Row]:
    rows: list[Row] = []
    async with rpcframe.aio.connect(target, rpcframe.ChannelConfig(default_timeout=5)) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)

        async def run(kind: str, coro: Any) -> None:
            start = time.perf_counter()
            result = await coro
            rows.append(("asyncio", kind, result, (time.perf_counter() - start) * 1000))

        async def unary() -> str:
            return repr((await stub.Echo(pb.EchoRequest(message="hello"))).message)

        async def server_stream() -> str:
            n = len([r async for r in stub.Expand(pb.ExpandRequest(message="tick", count=5))])
            return f"{n} responses"

        async def client_stream() -> str:
            r = await stub.Collect(_words("a", "b", "c"))
            return f"count={r.count} message={r.message!r}"

        async def bidi() -> str:
            return " ".join([r.message async for r in stub.Chat(_words("ping", "pong"))])

        for kind, fn in [("unary", unary), ("server stream", server_stream), ("client stream", client_stream),
                         ("bidi stream", bidi)]:  # fmt: skip
            await run(kind, fn())
    return rows


def health(target: str) -> str:
    with rpcframe.connect(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main() -> int:
    """Run the demo; returns the process exit code."""
    proc, target = start_server()
    try:
        print(f"echo server (asyncio, pid {proc.pid}) serving on {target}; health: {health(target)}\n")
        rows = sync_calls(target) + asyncio.run(aio_calls(target))
        print(f"{'client':<8} {'call kind':<14} {'ms':>7}  result")
        print(f"{'-' * 8} {'-' * 14} {'-' * 7}  {'-' * 40}")
        for front, kind, result, ms in rows:
            print(f"{front:<8} {kind:<14} {ms:>7.2f}  {result}")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        print(f"\nSIGTERM -> server drained and exited with code {code}")
        if code != 0 or len(rows) != 8:
            return 1
        print("\n== balancing and failover ==\n")
        if balancing_demo.main() != 0:
            return 1
        print("\n== deadlines, retries and hedging ==\n")
        if resilience_demo.main() != 0:
            return 1
        print("\n== observability: a trace of a retried call across a relay, and /metrics ==\n")
        if observability_demo.main() != 0:
            return 1
        print("\n== events: an order service publishes, a billing group consumes, one member is killed ==\n")
        return events_demo.main()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
