"""Micro-benchmarks of rpcframe's per-call client path (pytest-benchmark).

::

    .venv/bin/python -m pytest benchmarks/micro --benchmark-only -q

Not part of ``make test`` (testpaths is ``tests``). What they isolate:

- ``MethodBase._prepare``: the channel's default timeout and metadata applied
  to one call.
- the sync and asyncio wrappers around one unary call, with grpc itself
  replaced by a function that returns a ready response: wrapper cost =
  wrapper time - bare time. The wrapper still picks an endpoint from the
  real balancer of a channel connected to a real in-process server.

The performance notes give the budget: about 12 µs of client CPU per call
to stay within 5% of raw grpc.aio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterator
from typing import Any

import pytest

import rpcframe
import rpcframe.aio
import rpcframe.observe
from examples.bench_server import BenchServicer
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

REQUEST = bench_pb2.BenchRequest(payload=bytes(64), response_size=64)
RESPONSE = bench_pb2.BenchResponse(payload=bytes(64), server_id="micro")
AIO_BATCH = 1000  # awaits per benchmark round: one event-loop entry is amortized over them


def bare_call(request: Any, timeout: Any = None, metadata: Any = None, credentials: Any = None,
              wait_for_ready: Any = None, compression: Any = None) -> Any:  # fmt: skip
    """Stands in for grpc's multicallable: answers at once."""
    return RESPONSE


class _Ready:
    """Stands in for a grpc.aio call that has already finished."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, Any]:
        return RESPONSE
        yield  # a generator that returns at once

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False


def bare_aio_call(request: Any, **kwargs: Any) -> _Ready:
    """Stands in for grpc.aio's multicallable."""
    return _Ready()


def _replace_grpc(channel: Any, wrapper: Any, fake: Any) -> None:
    """Make every endpoint of ``channel`` answer ``wrapper``'s calls with ``fake``."""
    entries = channel.balancer.entries()
    handles = [getattr(e.stats, "handle", None) for e in entries]
    if not handles or not all(hasattr(h, "calls") for h in handles):
        pytest.skip("rpcframe's subchannel internals changed; update _replace_grpc")
    for handle in handles:
        handle.calls[wrapper] = fake


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """An in-process rpcframe server (only for connectivity and health)."""
    server = rpcframe.Server(rpcframe.ServerConfig(max_workers=4))
    server.add(BenchServicer())
    port = server.bind("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


# -- _prepare -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "metadata"),
    [
        (rpcframe.ChannelConfig(health_check=False), None),
        (rpcframe.ChannelConfig(health_check=False, default_timeout=5.0), None),
        (rpcframe.ChannelConfig(health_check=False, default_timeout=5.0, metadata=(("x-team", "a"),)),
         (("x-request", "1"),)),
    ],
    ids=["no-policy", "default-timeout", "timeout+metadata"],
)  # fmt: skip
def test_prepare(benchmark: Any, config: rpcframe.ChannelConfig, metadata: Any) -> None:
    with rpcframe.connect("127.0.0.1:1", config) as channel:  # never called: nothing listens there
        method = channel.stub(bench_pb2_grpc.BenchServiceStub).Unary
        plan = benchmark(method._prepare, REQUEST, None, metadata, None, None, None)
        assert plan.timeout == config.default_timeout


# -- sync wrapper ---------------------------------------------------------------


def test_sync_bare_function(benchmark: Any) -> None:
    assert benchmark(bare_call, REQUEST, None, None, None, None, None) is RESPONSE


def _telemetry() -> tuple[rpcframe.observe.CallObserver, ...]:
    """rpcframe.otel's tracing and metrics on SDK providers: spans recorded and dropped, metrics aggregated."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from rpcframe.otel import telemetry

    return telemetry(TracerProvider(), MeterProvider(metric_readers=[InMemoryMetricReader()]))


def _lean() -> tuple[rpcframe.observe.CallObserver, ...]:
    """Tracing with attempt spans only for retried calls, metrics by prometheus_client."""
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from rpcframe.otel import TracingObserver
    from rpcframe.prometheus import PrometheusObserver

    return TracingObserver(TracerProvider(), attempt_spans="retried"), PrometheusObserver(CollectorRegistry())


def _prometheus() -> tuple[rpcframe.observe.CallObserver, ...]:
    from prometheus_client import CollectorRegistry

    from rpcframe.prometheus import PrometheusObserver

    return (PrometheusObserver(CollectorRegistry()),)


def _otel_metrics() -> tuple[rpcframe.observe.CallObserver, ...]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from rpcframe.otel import MetricsObserver

    return (MetricsObserver(MeterProvider(metric_readers=[InMemoryMetricReader()])),)


#: The observer seam unset (the default), with one observer that does nothing, with OpenTelemetry,
#: and the cheaper choices (metrics only, by the SDK or by prometheus_client; tracing without
#: attempt spans for unretried calls plus Prometheus metrics).
OBSERVERS = pytest.mark.parametrize(
    "observers",
    [(), (rpcframe.observe.CallObserver(),), _telemetry(), _otel_metrics(), _prometheus(), _lean()],
    ids=["unobserved", "observed", "otel", "otel-metrics", "prometheus", "lean"],
)


@OBSERVERS
def test_sync_wrapper(benchmark: Any, target: str, observers: Any) -> None:
    with rpcframe.connect(target, rpcframe.ChannelConfig(observers=observers)) as channel:
        channel.wait_ready(10)
        method = channel.stub(bench_pb2_grpc.BenchServiceStub).Unary
        assert method(REQUEST, timeout=5).server_id  # one real call first
        _replace_grpc(channel, method, bare_call)
        assert benchmark(method, REQUEST) is RESPONSE


# -- asyncio wrapper --------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A private event loop (the benchmark drives it with run_until_complete)."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def test_aio_bare_coroutine_batch(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    """AIO_BATCH awaits of a call object that is already done."""

    async def batch() -> None:
        for _ in range(AIO_BATCH):
            await bare_aio_call(REQUEST)

    benchmark.extra_info["calls_per_round"] = AIO_BATCH
    benchmark(lambda: loop.run_until_complete(batch()))


@OBSERVERS
def test_aio_wrapper_batch(benchmark: Any, loop: asyncio.AbstractEventLoop, target: str, observers: Any) -> None:
    """AIO_BATCH awaits of the rpcframe wrapper around the same done call object."""

    async def open_channel() -> tuple[Any, Any]:
        channel = rpcframe.aio.connect(target, rpcframe.ChannelConfig(observers=observers))
        await asyncio.wait_for(channel.channel_ready(), 10)
        method = channel.stub(bench_pb2_grpc.BenchServiceStub).Unary
        assert (await method(REQUEST, timeout=5)).server_id  # one real call first
        return channel, method

    channel, method = loop.run_until_complete(open_channel())
    try:
        _replace_grpc(channel, method, bare_aio_call)

        async def batch() -> None:
            for _ in range(AIO_BATCH):
                await method(REQUEST)

        benchmark.extra_info["calls_per_round"] = AIO_BATCH
        benchmark(lambda: loop.run_until_complete(batch()))
    finally:
        loop.run_until_complete(channel.close())
