"""A rolling restart loses no call: SIGTERM under load, default settings.

Two ``rpcframe serve`` processes (default drain settings) carry 16 calls in
flight from an rpcframe client: idempotent unary calls, server streams and
non-idempotent ``Record`` calls. One gets SIGTERM; every call must still
succeed (the client moves away on NOT_SERVING; calls that arrive while the
server drains are refused unrun with the never-ran marker and fail over).
A single server stopped with calls queued for its workers finishes them.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import duration_pb2

import rpcframe
import rpcframe.aio
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc
from tests.cli import ServeProcess
from tests.conftest import eventually, wait_until

IN_FLIGHT = 16
LOAD = 0.5  # seconds of load after the SIGTERM
RUNS = 2
_keys = itertools.count()
_REQUEST = bench_pb2.BenchRequest(delay=duration_pb2.Duration(nanos=2_000_000), count=3)


def _serve(front: str) -> list[ServeProcess]:
    target = "examples.bench_server:servicer" if front == "sync" else "examples.bench_server:aio_servicer"
    return [ServeProcess(target, "--bind", "127.0.0.1:0") for _ in range(2)]


def _config() -> rpcframe.ChannelConfig:
    return rpcframe.ChannelConfig(slow_start=0, default_timeout=10)


def _in_picker(channel: rpcframe.Channel | rpcframe.aio.Channel, address: str) -> bool:
    return any(stats.address == address for stats in channel.balancer.picker.endpoints)


def _calls(stub: bench_pb2_grpc.BenchServiceStub) -> list[Callable[[], object]]:
    return [
        lambda: stub.Unary(_REQUEST),
        lambda: list(stub.ServerStream(_REQUEST)),
        lambda: stub.Record(bench_pb2.RecordRequest(key=f"k{next(_keys)}")),
    ]


def _sync_run(front: str) -> Counter[str]:
    backends = _serve(front)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    try:
        with rpcframe.connect([b.target for b in backends], _config()) as channel:
            wait_until(lambda: all(_in_picker(channel, b.target) for b in backends), timeout=10)
            calls = _calls(channel.stub(bench_pb2_grpc.BenchServiceStub))
            stop = threading.Event()
            give_up = time.monotonic() + 30

            def caller(index: int) -> None:
                call = calls[index % len(calls)]
                while not stop.is_set() and time.monotonic() < give_up:
                    try:
                        call()
                        outcome = "ok"
                    except rpcframe.RpcError as exc:
                        outcome = f"{exc.code().name}: {exc.details()}"
                    with lock:
                        outcomes[outcome] += 1

            threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(IN_FLIGHT)]
            for thread in threads:
                thread.start()
            wait_until(lambda: sum(outcomes.values()) >= IN_FLIGHT * 5, timeout=10)
            backends[0].proc.terminate()
            stop.wait(LOAD)
            stop.set()
            for thread in threads:
                thread.join(20)
            assert backends[0].proc.wait(20) == 0
    finally:
        for backend in backends:
            backend.kill()
    return outcomes


async def _aio_run(front: str) -> Counter[str]:
    backends = _serve(front)
    outcomes: Counter[str] = Counter()
    try:
        async with rpcframe.aio.connect([b.target for b in backends], _config()) as channel:

            async def all_picked() -> bool:
                return all(_in_picker(channel, b.target) for b in backends)

            await eventually(all_picked, within=10)
            stub = channel.stub(bench_pb2_grpc.BenchServiceStub)

            async def stream() -> object:
                return [r async for r in stub.ServerStream(_REQUEST)]

            calls = [lambda: stub.Unary(_REQUEST), stream, lambda: stub.Record(bench_pb2.RecordRequest(key="k"))]
            stop = asyncio.Event()
            give_up = time.monotonic() + 30

            async def caller(index: int) -> None:
                call = calls[index % len(calls)]
                while not stop.is_set() and time.monotonic() < give_up:
                    try:
                        await call()
                        outcomes["ok"] += 1
                    except rpcframe.RpcError as exc:
                        outcomes[f"{exc.code().name}: {exc.details()}"] += 1

            tasks = [asyncio.ensure_future(caller(i)) for i in range(IN_FLIGHT)]

            async def warmed_up() -> bool:
                return sum(outcomes.values()) >= IN_FLIGHT * 5

            await eventually(warmed_up, within=10)
            backends[0].proc.terminate()
            await asyncio.sleep(LOAD)  # load after the SIGTERM (not a wait for a condition)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 20)
            assert await asyncio.to_thread(backends[0].proc.wait, 20) == 0
    finally:
        for backend in backends:
            backend.kill()
    return outcomes


@pytest.mark.parametrize("front", ["sync", "aio"])
def test_sigterm_under_load_fails_no_call_sync_client(front: str) -> None:
    for _ in range(RUNS):
        outcomes = _sync_run(front)
        assert set(outcomes) == {"ok"}, outcomes


@pytest.mark.parametrize("front", ["sync", "aio"])
async def test_sigterm_under_load_fails_no_call_aio_client(front: str) -> None:
    for _ in range(RUNS):
        outcomes = await _aio_run(front)
        assert set(outcomes) == {"ok"}, outcomes


class _Slow(bench_pb2_grpc.BenchServiceServicer):
    def Unary(self, request: bench_pb2.BenchRequest, context: grpc.ServicerContext) -> bench_pb2.BenchResponse:
        time.sleep(0.05)
        return bench_pb2.BenchResponse(server_id="slow")


@pytest.fixture
def busy_server() -> Iterator[rpcframe.Server]:
    config = rpcframe.ServerConfig(max_workers=2, max_concurrent_streams=8, drain_delay=0, grace_period=10)
    server = rpcframe.Server(config)
    server.add(_Slow())
    server.bind("127.0.0.1:0")
    server.start()
    yield server
    server.stop(0)


def test_stop_runs_calls_queued_for_a_worker(busy_server: rpcframe.Server) -> None:
    """Before: calls waiting for one of the server's threads were CANCELLED by stop()."""
    with grpc.insecure_channel(f"127.0.0.1:{busy_server.ports[0]}") as channel:
        unary = channel.unary_unary(
            "/rpcframe.bench.v1.BenchService/Unary",
            bench_pb2.BenchRequest.SerializeToString, bench_pb2.BenchResponse.FromString,
        )  # fmt: skip
        futures = [unary.future(bench_pb2.BenchRequest(), timeout=20) for _ in range(8)]
        wait_until(lambda: busy_server.inflight == 2 and busy_server._executor.queued() == 6)
        busy_server.stop()
        assert [f.result().server_id for f in futures] == ["slow"] * 8
