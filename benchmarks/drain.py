"""How long a client takes to stop picking a server that began draining.

``rpcframe serve`` (default settings apart from ``--drain-delay``) runs two
backends in child processes; an rpcframe asyncio or sync client keeps 16
calls in flight over both; one backend gets SIGTERM. Measured per run: the
client's reaction time (SIGTERM sent -> that endpoint out of the client's
picker: signal, NOT_SERVING on the health Watch, the picker rebuild),
the calls that failed, and how long the process took to exit. The default
``ServerConfig.drain_delay`` is sized from the reaction time measured here.

    python -m benchmarks.drain [--runs 10] [--drain-delay 0.0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.cli import ServeProcess

IN_FLIGHT = 16
errors: dict[str, int] = {}
_LOAD_SECONDS = 1.0  # load before and after the SIGTERM


def _describe(exc: rpcframe.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()[:80]}"


def _backends(front: str, drain_delay: float) -> list[ServeProcess]:
    return [
        ServeProcess("tests.servicers:tagged" if front == "sync" else "tests.servicers:aio_tagged",
                     "--bind", "127.0.0.1:0", "--drain-delay", str(drain_delay))
        for _ in range(2)
    ]  # fmt: skip


def _picked(channel: Any, address: str) -> bool:
    return any(stats.address == address for stats in channel.balancer.picker.endpoints)


async def _aio_run(front: str, drain_delay: float) -> dict[str, float]:
    backends = _backends(front, drain_delay)
    try:
        config = rpcframe.ChannelConfig(slow_start=0, default_timeout=5)
        async with rpcframe.aio.connect([b.target for b in backends], config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            await channel.channel_ready()
            until_ready = time.monotonic() + 10
            while not all(_picked(channel, b.target) for b in backends) and time.monotonic() < until_ready:  # noqa: ASYNC110 - polls the picker, no event marks it
                await asyncio.sleep(0.005)
            failed, done = 0, 0
            stop_at = time.monotonic() + 2 * _LOAD_SECONDS

            async def caller() -> None:
                nonlocal failed, done
                while time.monotonic() < stop_at:
                    try:
                        await stub.Echo(pb.EchoRequest(message="sleep:0.002"))
                        done += 1
                    except rpcframe.RpcError as exc:
                        failed += 1
                        errors[_describe(exc)] = errors.get(_describe(exc), 0) + 1

            callers = [asyncio.ensure_future(caller()) for _ in range(IN_FLIGHT)]
            await asyncio.sleep(_LOAD_SECONDS)
            victim = backends[0]
            sent = time.monotonic()
            victim.proc.terminate()
            exited = asyncio.ensure_future(asyncio.to_thread(_wait_exit, victim, sent))
            while _picked(channel, victim.target) and time.monotonic() - sent < 10:  # noqa: ASYNC110 - measures when the picker changes
                await asyncio.sleep(0.0005)
            reaction = time.monotonic() - sent
            await asyncio.gather(*callers)
            exit_s = await exited
            return {"reaction_ms": reaction * 1000, "failed": failed, "calls": done, "exit_s": exit_s}
    finally:
        for backend in backends:
            backend.kill()


async def _aio_runs(front: str, drain_delay: float, runs: int) -> list[dict[str, float]]:
    return [await _aio_run(front, drain_delay) for _ in range(runs)]


def _sync_run(front: str, drain_delay: float) -> dict[str, float]:
    backends = _backends(front, drain_delay)
    try:
        config = rpcframe.ChannelConfig(slow_start=0, default_timeout=5)
        with rpcframe.connect([b.target for b in backends], config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            channel.wait_ready(10)
            until_ready = time.monotonic() + 10
            while not all(_picked(channel, b.target) for b in backends) and time.monotonic() < until_ready:
                time.sleep(0.005)
            counts = {"failed": 0, "calls": 0}
            lock = threading.Lock()
            stop_at = time.monotonic() + 2 * _LOAD_SECONDS

            def caller() -> None:
                while time.monotonic() < stop_at:
                    try:
                        stub.Echo(pb.EchoRequest(message="sleep:0.002"))
                        key = "calls"
                    except rpcframe.RpcError as exc:
                        key = "failed"
                        errors[_describe(exc)] = errors.get(_describe(exc), 0) + 1
                    with lock:
                        counts[key] += 1

            threads = [threading.Thread(target=caller, daemon=True) for _ in range(IN_FLIGHT)]
            for thread in threads:
                thread.start()
            time.sleep(_LOAD_SECONDS)
            victim = backends[0]
            sent = time.monotonic()
            victim.proc.terminate()
            exit_s: list[float] = []
            waiter = threading.Thread(target=lambda: exit_s.append(_wait_exit(victim, sent)), daemon=True)
            waiter.start()
            while _picked(channel, victim.target) and time.monotonic() - sent < 10:
                time.sleep(0.0005)
            reaction = time.monotonic() - sent
            for thread in [*threads, waiter]:
                thread.join(30)
            return {"reaction_ms": reaction * 1000, **counts, "exit_s": exit_s[0] if exit_s else float("nan")}
    finally:
        for backend in backends:
            backend.kill()


def _wait_exit(backend: ServeProcess, since: float) -> float:
    backend.proc.wait(30)
    return time.monotonic() - since


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--drain-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    for server in ("sync", "aio"):
        for client in ("sync", "aio"):
            if client == "sync":
                runs = [_sync_run(server, args.drain_delay) for _ in range(args.runs)]
            else:  # one event loop for every run: grpc.aio outlives a closed loop badly
                runs = asyncio.run(_aio_runs(server, args.drain_delay, args.runs))
            reaction = [r["reaction_ms"] for r in runs]
            print(
                f"server {server:4} client {client:4}: reaction ms median {statistics.median(reaction):.1f} "
                f"[{min(reaction):.1f}-{max(reaction):.1f}], failed calls {sum(r['failed'] for r in runs)} "
                f"of {sum(r['calls'] + r['failed'] for r in runs)} in {args.runs} runs, runs with failures "
                f"{sum(1 for r in runs if r['failed'])}, "
                f"exit s median {statistics.median(r['exit_s'] for r in runs):.2f}",
                flush=True,
            )
    print("failures:", errors or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
