"""The thread-pool server's per-call wrapper, with and without overload protection and rate limits.

The wrapped handler is called directly with a stand-in for grpc's servicer
context (no network), so this is rpcframe's own server-side CPU per unary call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import rpcframe
from examples.bench_server import BenchServicer
from generated.rpcframe.bench.v1 import bench_pb2

REQUEST = bench_pb2.BenchRequest(payload=bytes(64))


class _Context:
    """What the wrapper asks of grpc's context on the admitted path."""

    def time_remaining(self) -> float:
        return 5.0

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def add_callback(self, callback: Any) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:  # pragma: no cover - never refused here
        raise AssertionError(f"refused: {code} {details}")


CONFIGS = pytest.mark.parametrize(
    "config",
    [
        rpcframe.ServerConfig(overload=None),
        rpcframe.ServerConfig(),
        rpcframe.ServerConfig(rate_limits=(rpcframe.RateLimit(rate=1e9),)),
    ],
    ids=["unprotected", "overload-default", "overload+rate-limit"],
)


@pytest.fixture
def server() -> Iterator[rpcframe.Server]:
    made: list[rpcframe.Server] = []
    yield made  # type: ignore[misc]
    for s in made:
        s.stop(0)


@CONFIGS
def test_sync_server_wrapper(benchmark: Any, config: rpcframe.ServerConfig) -> None:
    server = rpcframe.Server(config)
    server.add(BenchServicer())
    handler = server._services[0].handlers["Unary"]
    wrapped = server._wrap("/rpcframe.bench.v1.BenchService/Unary", handler)
    context = _Context()

    def call() -> Any:
        return wrapped.stream_unary(iter((REQUEST,)), context)

    assert call().payload is not None
    benchmark(call)
