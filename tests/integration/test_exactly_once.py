"""A non-idempotent call runs once, whatever its server's error text says.

The client once decided "this call never left me" from the words of an
UNAVAILABLE status ("connection refused", "failed to connect"), so a handler
whose own dependency refused a connection, or a relay passing on its
downstream's error, had its call resent to every other endpoint. These tests
count executions per request on the servers.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc
from rpcframe._core.retry import NOT_RUN_KEY
from tests.conftest import eventually, wait_until
from tests.servicers import Backend

CALLS = 20
_ids = itertools.count()

# What a handler raises after it has done its work, by key prefix.
FAILURES = {
    # The default mapping turns ConnectionRefusedError into UNAVAILABLE "[Errno 111] Connection refused".
    "refused": lambda: ConnectionRefusedError(111, "Connection refused"),
    # A relay passing on its downstream's words.
    "relay": lambda: rpcframe.Unavailable("failed to connect to all addresses; last error: Connection refused"),
    # A relay re-raising a downstream server's never-ran refusal, marker included.
    "marker": lambda: rpcframe.Unavailable("the call was not run", trailing_metadata=((NOT_RUN_KEY, "1"),)),
}


class Recorder(bench_pb2_grpc.BenchServiceServicer):
    """Record counts executions per key, then fails as the key's prefix says."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self._lock = threading.Lock()

    def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:
        with self._lock:
            self.counts[request.key] = self.counts.get(request.key, 0) + 1
        raise FAILURES[request.key.partition(":")[0]]()


class AioRecorder(bench_pb2_grpc.BenchServiceServicer):
    """asyncio Recorder."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    async def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:  # type: ignore[override]
        self.counts[request.key] = self.counts.get(request.key, 0) + 1
        raise FAILURES[request.key.partition(":")[0]]()


def _config() -> rpcframe.ChannelConfig:
    return rpcframe.ChannelConfig(policy="round_robin", slow_start=0, default_timeout=10)


@pytest.fixture
def recorders() -> Iterator[tuple[list[str], dict[str, int]]]:
    counts: dict[str, int] = {}
    started = [Backend(Recorder(counts)) for _ in range(3)]
    yield [b.address for b in started], counts
    for backend in started:
        backend.stop()


@pytest.fixture
async def aio_recorders() -> AsyncIterator[tuple[list[str], dict[str, int]]]:
    counts: dict[str, int] = {}
    servers = []
    for _ in range(3):
        server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1))
        server.add(AioRecorder(counts))
        servers.append((server, server.bind("127.0.0.1:0")))
        await server.start()
    yield [f"127.0.0.1:{port}" for _, port in servers], counts
    for server, _ in servers:
        await server.stop(0)


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_sync_client_runs_a_failing_non_idempotent_call_once(
    recorders: tuple[list[str], dict[str, int]], kind: str
) -> None:
    addresses, counts = recorders
    with rpcframe.connect(addresses, _config()) as channel:
        wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        keys = [f"{kind}:{next(_ids)}" for _ in range(CALLS)]
        for key in keys:
            with pytest.raises(rpcframe.Unavailable):
                stub.Record(bench_pb2.RecordRequest(key=key))
        assert [counts[key] for key in keys] == [1] * CALLS
        assert channel.stats.failovers == channel.stats.retries == 0


@pytest.mark.parametrize("kind", sorted(FAILURES))
async def test_aio_runs_a_failing_non_idempotent_call_once(
    aio_recorders: tuple[list[str], dict[str, int]], kind: str
) -> None:
    addresses, counts = aio_recorders
    async with rpcframe.aio.connect(addresses, _config()) as channel:

        async def ready() -> bool:
            return all(state == "READY" for _, state in channel.endpoints())

        await eventually(ready)
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        keys = [f"{kind}:{next(_ids)}" for _ in range(CALLS)]
        for key in keys:
            with pytest.raises(rpcframe.Unavailable) as caught:
                await stub.Record(bench_pb2.RecordRequest(key=key))
            assert NOT_RUN_KEY not in dict(caught.value.trailing_metadata())
        assert [counts[key] for key in keys] == [1] * CALLS
        assert channel.stats.failovers == channel.stats.retries == 0
