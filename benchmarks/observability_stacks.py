"""The stacks ``benchmarks.observability`` compares, their OpenTelemetry setup, server and load generator.

Every stack that traces or records metrics gets the same SDK setup, client
and server alike (:func:`setup_sdk`): a ``TracerProvider`` (always-on
sampling, or ``ParentBased(TraceIdRatioBased(r))``) with a span counter
(:class:`SpanCounter`) and a ``BatchSpanProcessor`` to an exporter that
counts and discards (:class:`DiscardingExporter`), and a ``MeterProvider``
with an ``InMemoryMetricReader`` that is read only once, after the run. Both
become the global providers, which is what
``opentelemetry-instrumentation-grpc`` uses; rpcframe gets them passed.

A server for one stack and front, in its own process::

    python -m benchmarks.observability_stacks --stack rpcframe+otel --aio --bind 127.0.0.1:0

prints ``serving on HOST:PORT`` and drains on SIGTERM (the servicers and raw
servers are ``examples.bench_server``'s; rpcframe servers are configured as
there, plus the stack's observers). :func:`load_child` is the load generator
process: ``rpcframe.bench``'s :class:`~rpcframe.bench.engine.LoadRun` with
the stack's client (observers on rpcframe channels; the official
instrumentation patches grpc's channel constructors for raw ones).
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from rpcframe.bench.engine import _CHANNEL_OPTIONS, LoadRun
from rpcframe.bench.spec import BenchError, LoadSpec
from rpcframe.observe import CallObserver

# -- stacks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """One way to serve and call: grpcio or rpcframe, and what observes the calls.

    ``observers``: "" (none), "telemetry" (rpcframe.otel tracing + metrics),
    "tracing", "metrics" or "noop" (one :class:`CallObserver` that does nothing).
    """

    name: str
    client: str  # "raw" | "rpcframe"
    title: str
    instrumented: bool = False  # opentelemetry-instrumentation-grpc on client and server
    observers: str = ""
    ratio: float = 1.0  # head sampling: 1.0 is always-on, else ParentBased(TraceIdRatioBased(ratio))

    @property
    def uses_sdk(self) -> bool:
        """Whether this stack's processes set up OpenTelemetry providers."""
        return self.instrumented or self.observers in ("telemetry", "tracing", "metrics", "tracing-retried", "lean")


RAW = Stack("raw", "raw", "raw grpcio")
RAW_OTEL = Stack("raw+otel", "raw", "raw grpcio + opentelemetry-instrumentation-grpc", instrumented=True)
RF = Stack("rpcframe", "rpcframe", "rpcframe, no observers")
RF_OTEL = Stack("rpcframe+otel", "rpcframe", "rpcframe + telemetry() (tracing + metrics)", observers="telemetry")
RF_TRACING = Stack("rpcframe+tracing", "rpcframe", "rpcframe + TracingObserver only", observers="tracing")
RF_METRICS = Stack("rpcframe+metrics", "rpcframe", "rpcframe + MetricsObserver only", observers="metrics")
RF_NOOP = Stack("rpcframe+noop", "rpcframe", "rpcframe + one no-op observer (the seam's dispatch)", observers="noop")
RF_OTEL_1PCT = Stack("rpcframe+otel-1%", "rpcframe", "rpcframe + telemetry(), ParentBased(TraceIdRatio 1 %)",
                     observers="telemetry", ratio=0.01)  # fmt: skip

RF_TRACING_RETRIED = Stack("rpcframe+tracing-retried", "rpcframe",
                           "rpcframe + TracingObserver(attempt_spans='retried') only", observers="tracing-retried")
RF_PROMETHEUS = Stack("rpcframe+prometheus", "rpcframe", "rpcframe + PrometheusObserver only", observers="prometheus")
RF_LEAN = Stack("rpcframe+lean", "rpcframe",
                "rpcframe + TracingObserver(attempt_spans='retried') + PrometheusObserver", observers="lean")

#: Headline stacks first, then the component and sampling rows.
STACKS: tuple[Stack, ...] = (
    RAW, RAW_OTEL, RF, RF_OTEL, RF_TRACING, RF_METRICS, RF_NOOP, RF_OTEL_1PCT, RF_TRACING_RETRIED, RF_PROMETHEUS,
    RF_LEAN,
)  # fmt: skip
BY_NAME = {s.name: s for s in STACKS}


# -- the SDK ------------------------------------------------------------------------


class SpanCounter(SpanProcessor):
    """Counts spans started and ended; :meth:`wait_settled` waits until every started span has ended.

    With ``by_status``, ended spans are also counted per (kind, ``rpc.grpc.status_code``).
    """

    def __init__(self, by_status: bool = False) -> None:
        self.started = 0
        self.ended = 0
        self.statuses: Counter[tuple[str, Any]] = Counter()
        self._by_status = by_status
        self._settled = threading.Condition()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Count a started span."""
        with self._settled:
            self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        """Count an ended span (and its status code)."""
        with self._settled:
            self.ended += 1
            if self._by_status:
                code = (span.attributes or {}).get("rpc.grpc.status_code")
                self.statuses[(span.kind.name, code)] += 1
            if self.ended >= self.started:
                self._settled.notify_all()

    @property
    def open(self) -> int:
        """Spans started and not ended yet."""
        with self._settled:
            return self.started - self.ended

    def wait_settled(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until every started span has ended; whether they have."""
        with self._settled:
            return self._settled.wait_for(lambda: self.ended >= self.started, timeout)

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing buffered."""
        return True


class DiscardingExporter(SpanExporter):
    """An exporter that counts the spans it is given and drops them."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Count and discard."""
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing buffered."""
        return True


@dataclass
class Sdk:
    """One process's OpenTelemetry setup (the same for every stack that uses one)."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    reader: InMemoryMetricReader
    exporter: DiscardingExporter
    counter: SpanCounter | None = None

    def exported(self) -> int:
        """Spans exported so far, after pushing out what the batch processor holds."""
        self.tracer_provider.force_flush()
        return self.exporter.exported

    def shutdown(self) -> None:
        """Flush the batch processor and stop both providers."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def sampler(ratio: float) -> Sampler:
    """Always-on for 1.0, else ``ParentBased(TraceIdRatioBased(ratio))``."""
    return ALWAYS_ON if ratio >= 1.0 else ParentBased(TraceIdRatioBased(ratio))


def setup_sdk(ratio: float = 1.0, *, make_global: bool = True, counter: SpanCounter | None = None) -> Sdk:
    """The providers every traced stack uses; ``make_global`` installs them as OpenTelemetry's globals.

    ``counter`` (the cancelled-streams check) is added as a span processor
    before the batch processor; the benchmark runs without one (it costs a
    few µs per span) and counts spans at the exporter.
    """
    exporter = DiscardingExporter()
    tracer_provider = TracerProvider(sampler=sampler(ratio))
    if counter is not None:
        tracer_provider.add_span_processor(counter)
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    if make_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return Sdk(tracer_provider, meter_provider, reader, exporter, counter)


def observers_for(stack: Stack, sdk: Sdk | None) -> tuple[CallObserver, ...]:
    """The rpcframe observers of ``stack`` (empty for raw stacks and for plain rpcframe)."""
    if stack.observers == "noop":
        return (CallObserver(),)
    if not stack.observers or (sdk is None and stack.observers != "prometheus"):
        return ()
    from rpcframe.otel import MetricsObserver, TracingObserver, telemetry

    if stack.observers == "prometheus":
        from prometheus_client import CollectorRegistry

        from rpcframe.prometheus import PrometheusObserver

        return (PrometheusObserver(CollectorRegistry()),)
    if stack.observers == "tracing":
        return (TracingObserver(sdk.tracer_provider),)
    if stack.observers in ("tracing-retried", "lean"):
        tracing = TracingObserver(sdk.tracer_provider, attempt_spans="retried")
        if stack.observers == "tracing-retried":
            return (tracing,)
        from prometheus_client import CollectorRegistry

        from rpcframe.prometheus import PrometheusObserver

        return tracing, PrometheusObserver(CollectorRegistry())
    if stack.observers == "metrics":
        return (MetricsObserver(sdk.meter_provider),)
    return telemetry(sdk.tracer_provider, sdk.meter_provider)


def instrument(stack: Stack, front: str, side: str) -> None:
    """Install opentelemetry-instrumentation-grpc for ``side`` ("client"/"server") of ``front`` ("sync"/"aio")."""
    if not stack.instrumented:
        return
    from opentelemetry.instrumentation import grpc as otel_grpc

    classes: dict[tuple[str, str], Any] = {
        ("sync", "client"): otel_grpc.GrpcInstrumentorClient,
        ("sync", "server"): otel_grpc.GrpcInstrumentorServer,
        ("aio", "client"): otel_grpc.GrpcAioInstrumentorClient,
        ("aio", "server"): otel_grpc.GrpcAioInstrumentorServer,
    }  # fmt: skip
    classes[(front, side)]().instrument()


def metric_count(sdk: Sdk, name: str) -> int:
    """How many measurements histogram ``name`` holds (read from the in-memory reader once)."""
    data = sdk.reader.get_metrics_data()
    total = 0
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    total += sum(getattr(p, "count", 0) for p in metric.data.data_points)
    return total


# -- the server ---------------------------------------------------------------------


def serve(stack: Stack, front: str, bind: str, workers: int, grace: float) -> None:
    """Run ``stack``'s BenchService server for ``front`` until SIGTERM/SIGINT."""
    from examples import bench_server

    sdk = setup_sdk(stack.ratio) if stack.uses_sdk else None
    try:
        if stack.client == "raw":
            instrument(stack, front, "server")  # patches grpc.server / grpc.aio.server, which the raw servers call
            if front == "aio":
                bench_server._run_loop(bench_server.serve_raw_aio(bind, grace), False)
            else:
                bench_server.serve_raw_sync(bind, workers, grace)
        elif front == "aio":
            bench_server._run_loop(_serve_rpcframe_aio(bind, grace, observers_for(stack, sdk)), False)
        else:
            _serve_rpcframe_sync(bind, workers, grace, observers_for(stack, sdk))
    finally:
        if sdk is not None:
            sdk.shutdown()
            # For a look by hand (the harness does not read it): were this server's calls traced?
            print(f"{stack.name} {front} server: {sdk.exporter.exported} spans exported", file=sys.stderr)


def _serve_rpcframe_sync(bind: str, workers: int, grace: float, observers: tuple[CallObserver, ...]) -> None:
    """examples.bench_server's rpcframe thread-pool server, with ``observers``."""
    import rpcframe
    from examples import bench_server

    config = rpcframe.ServerConfig(max_workers=workers, max_concurrent_streams=1000, grace_period=grace,
                                   observers=observers)  # fmt: skip
    server = rpcframe.Server(config)
    server.add(bench_server.BenchServicer())
    port = server.bind(bind)
    server.run(on_ready=lambda: bench_server._ready(bind, [port]))


async def _serve_rpcframe_aio(bind: str, grace: float, observers: tuple[CallObserver, ...]) -> None:
    """examples.bench_server's rpcframe asyncio server, with ``observers``."""
    import rpcframe
    import rpcframe.aio
    from examples import bench_server

    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=grace, observers=observers))
    server.add(bench_server.AioBenchServicer())
    port = server.bind(bind)
    await server.run(on_ready=lambda: bench_server._ready(bind, [port]))


# -- the load generator --------------------------------------------------------------


class ObservedLoadRun(LoadRun):
    """rpcframe.bench's load loops, with rpcframe channels that carry ``observers``."""

    def __init__(self, spec: LoadSpec, observers: tuple[CallObserver, ...], **hooks: Any) -> None:
        super().__init__(spec, **hooks)
        self._observers = observers

    def _config(self) -> Any:
        import rpcframe

        return rpcframe.ChannelConfig(grpc_options=_CHANNEL_OPTIONS, observers=self._observers)

    def _open_sync(self) -> Any:
        if self.spec.client == "raw":
            return super()._open_sync()  # grpc.insecure_channel: instrumented when the stack is
        import rpcframe

        return rpcframe.connect(self.spec.target, self._config())

    def _open_aio(self) -> Any:
        if self.spec.client == "raw":
            return super()._open_aio()
        import rpcframe.aio

        return rpcframe.aio.connect(self.spec.target, self._config())


def load_child(spec: LoadSpec, stack_name: str, barriers: tuple[Any, Any], results: Any, timeouts: tuple[float, float]
               ) -> None:  # fmt: skip
    """A load-generator process: one run of ``spec`` on ``stack_name``'s client; puts (partial, error, extra)."""
    stack = BY_NAME[stack_name]
    sdk = setup_sdk(stack.ratio) if stack.uses_sdk else None
    instrument(stack, spec.mode, "client")
    spans: list[int] = []

    def hook(barrier: Any, timeout: float) -> Callable[[], None]:
        def at_barrier() -> None:
            # Outside the measured phase: every caller has returned, so every span has ended.
            spans.append(sdk.exported() if sdk is not None else 0)
            barrier.wait(timeout)

        return at_barrier

    run = ObservedLoadRun(spec, observers_for(stack, sdk), on_measure_start=hook(barriers[0], timeouts[0]),
                          on_measure_end=hook(barriers[1], timeouts[1]))  # fmt: skip
    try:
        partial = run.run()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as text
        for barrier in barriers:
            barrier.abort()
        results.put((None, str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}", {}))
        return
    extra: dict[str, Any] = {"client_spans": spans[1] - spans[0] if len(spans) == 2 else 0}
    if sdk is not None:
        extra["client_call_metrics"] = metric_count(sdk, "grpc.client.call.duration")
        sdk.shutdown()
    results.put((partial, None, extra))


def main(argv: list[str] | None = None) -> int:
    """Serve one stack's BenchService (see the module docstring)."""
    prog, description = "python -m benchmarks.observability_stacks", __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--stack", required=True, choices=sorted(BY_NAME))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--aio", dest="front", action="store_const", const="aio", default="aio")
    mode.add_argument("--sync", dest="front", action="store_const", const="sync")
    parser.add_argument("--bind", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--workers", type=int, default=16, help="thread-pool size of sync servers")
    parser.add_argument("--grace", type=float, default=2.0, help="seconds in-flight calls get on SIGTERM")
    args = parser.parse_args(argv)
    serve(BY_NAME[args.stack], args.front, args.bind, args.workers, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
