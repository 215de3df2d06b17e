"""Servers for the bench harness tests: rpcframe and raw grpcio, on 127.0.0.1:0."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection

import rpcframe
from examples.bench_server import SERVICE_NAME, BenchServicer
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc


class CountingServicer(BenchServicer):
    """BenchServicer that counts the requests it handled, per method."""

    def __init__(self) -> None:
        super().__init__(server_id="test")
        self.counts: dict[str, int] = {}
        self._count_lock = threading.Lock()

    def _count(self, method: str, n: int = 1) -> None:
        with self._count_lock:
            self.counts[method] = self.counts.get(method, 0) + n

    def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        self._count("Unary")
        return super().Unary(request, context)

    def ServerStream(self, request: bench_pb2.BenchRequest, context: Any) -> Iterator[bench_pb2.BenchResponse]:
        self._count("ServerStream")
        yield from super().ServerStream(request, context)

    def PingPong(self, request_iterator: Iterator[bench_pb2.BenchRequest], context: Any) -> Iterator[Any]:
        def counted() -> Iterator[bench_pb2.BenchRequest]:
            for request in request_iterator:
                self._count("PingPong")
                yield request

        yield from super().PingPong(counted(), context)


class Served:
    """A running server, its servicer and target."""

    def __init__(self, servicer: CountingServicer, port: int) -> None:
        self.servicer = servicer
        self.target = f"127.0.0.1:{port}"


@pytest.fixture
def rpcframe_server() -> Iterator[Served]:
    """rpcframe's thread-pool server with the counting BenchServicer."""
    servicer = CountingServicer()
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1.0))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    server.start()
    try:
        yield Served(servicer, port)
    finally:
        server.stop(0)


@pytest.fixture
def raw_server() -> Iterator[Served]:
    """A plain grpcio server (no rpcframe) with reflection."""
    servicer = CountingServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    bench_pb2_grpc.add_BenchServiceServicer_to_server(servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Served(servicer, port)
    finally:
        server.stop(0).wait(5)
