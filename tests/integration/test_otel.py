"""OpenTelemetry on the observer seam: traces across 3 hops, retries as attempt spans, A66 metrics.

Each test has its own SDK providers (in-memory exporter and reader) passed to
the observers; nothing global is set.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import rpcframe
import rpcframe.aio
from examples.echo import AioEchoServicer, EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.observe import CallObserver, ServerCallInfo
from rpcframe.otel import telemetry
from rpcframe.security import ApiKeys, AuthConfig, StaticToken
from tests.conftest import Running, eventually, wait_until
from tests.servicers import AioScriptedEcho, Backend, ScriptedEcho

ECHO = "rpcframe.echo.v1.EchoService/Echo"


class OpenSpans(SpanProcessor):
    """Counts spans started and not yet ended."""

    def __init__(self) -> None:
        self.open = 0
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        with self._lock:
            self.open += 1

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.open -= 1


class Telemetry:
    """SDK providers with in-memory export, and the observers that report to them."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.open_spans = OpenSpans()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.tracer_provider.add_span_processor(self.open_spans)
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.observers: tuple[CallObserver, ...] = telemetry(self.tracer_provider, self.meter_provider)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        """Every data point of the metric ``name`` collected now."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    made = Telemetry()
    yield made
    made.tracer_provider.shutdown()
    made.meter_provider.shutdown()


def _one(spans: list[ReadableSpan], kind: SpanKind, parent: ReadableSpan | None) -> ReadableSpan:
    """The one span of ``kind`` whose parent is ``parent`` (None: a root span)."""
    parent_id = None if parent is None else parent.context.span_id
    found = [s for s in spans if s.kind is kind and (s.parent.span_id if s.parent else None) == parent_id]
    found = [s for s in found if "rpcframe.attempt" not in (s.attributes or {})]
    assert len(found) == 1, [(s.name, s.kind, s.attributes) for s in spans]
    return found[0]


def _attempts(spans: list[ReadableSpan], call: ReadableSpan) -> list[ReadableSpan]:
    children = [s for s in spans if s.parent is not None and s.parent.span_id == call.context.span_id]
    attempts = [s for s in children if "rpcframe.attempt" in (s.attributes or {})]
    return sorted(attempts, key=lambda s: (s.attributes or {})["rpcframe.attempt"])


def _assert_three_hops(spans: list[ReadableSpan]) -> None:
    """client call -> attempt -> relay server -> relay's call -> attempt -> backend server, one trace."""
    client = _one(spans, SpanKind.CLIENT, None)
    relay = _one(spans, SpanKind.SERVER, _attempts(spans, client)[0])  # the server span is the attempt's child
    relay_call = _one(spans, SpanKind.CLIENT, relay)
    backend = _one(spans, SpanKind.SERVER, _attempts(spans, relay_call)[0])
    assert {s.context.trace_id for s in spans} == {client.context.trace_id}
    assert client.name == relay.name == backend.name == ECHO
    for call in (client, relay_call):
        (attempt,) = _attempts(spans, call)
        attributes = attempt.attributes or {}
        assert attributes["rpcframe.attempt.reason"] == "first"
        assert attributes["server.address"] == "127.0.0.1"
        assert isinstance(attributes["server.port"], int)
        assert attributes["rpc.grpc.status_code"] == 0
    assert (backend.attributes or {})["rpc.service"] == "rpcframe.echo.v1.EchoService"
    assert (backend.attributes or {})["rpc.method"] == "Echo"
    assert (client.attributes or {})["rpc.system"] == "grpc"
    assert "enduser.id" not in (backend.attributes or {})  # no auth configured: no principal


def _by_trace(spans: list[ReadableSpan]) -> list[list[ReadableSpan]]:
    traces: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        traces.setdefault(span.context.trace_id, []).append(span)
    return list(traces.values())


# -- traces ---------------------------------------------------------------------------


class Relay(EchoServicer):
    """Answers Echo by calling the backend behind it."""

    def __init__(self, stub: Any) -> None:
        super().__init__()
        self.stub = stub

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        return self.stub.Echo(request)  # type: ignore[no-any-return]


class AioRelay(AioEchoServicer):
    """Answers Echo by calling the backend behind it (asyncio)."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:  # type: ignore[override]
        return await self.stub.Echo(request)  # type: ignore[no-any-return]


def _server(servicer: object, observers: tuple[CallObserver, ...]) -> tuple[rpcframe.Server, str]:
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1, observers=observers))
    server.add(servicer)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    return server, address


class CurrentSpan(CallObserver):
    """Records, after the tracing observer, whether a span is current when a handler starts and ends."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def call_received(self, call: ServerCallInfo) -> None:
        self.seen.append(("received", trace.get_current_span().get_span_context().is_valid))

    def call_finished(self, call: ServerCallInfo, status: grpc.StatusCode, latency: float) -> None:
        self.seen.append(("finished", trace.get_current_span().get_span_context().is_valid))


def test_sync_trace_links_three_hops(otel: Telemetry) -> None:
    config = rpcframe.ChannelConfig(observers=otel.observers, default_timeout=10)
    probe = CurrentSpan()
    backend, backend_address = _server(ScriptedEcho("backend"), (*otel.observers, probe))
    with rpcframe.connect(backend_address, config) as to_backend:
        relay, relay_address = _server(Relay(to_backend.stub(echo_pb2_grpc.EchoServiceStub)), otel.observers)
        try:
            with rpcframe.connect(relay_address, config) as channel:
                stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
                answers = [stub.Echo(pb.EchoRequest(message="whoami")).message for _ in range(2)]
        finally:
            relay.stop(0)
            backend.stop(0)
    assert answers == ["backend", "backend"]
    traces = _by_trace(otel.finished())
    assert len(traces) == 2
    for spans in traces:
        _assert_three_hops(spans)
    # the server span is current while the handler runs, and gone from the pool thread after
    assert probe.seen == [("received", True), ("finished", False)] * 2


async def test_aio_trace_links_three_hops(otel: Telemetry) -> None:
    config = rpcframe.ChannelConfig(observers=otel.observers, default_timeout=10)
    servers = []
    try:
        backend = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1, observers=otel.observers))
        backend.add(AioScriptedEcho("backend"))
        backend_address = f"127.0.0.1:{backend.bind('127.0.0.1:0')}"
        servers.append(backend)
        await backend.start()
        async with rpcframe.aio.connect(backend_address, config) as to_backend:
            relay = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1, observers=otel.observers))
            relay.add(AioRelay(to_backend.stub(echo_pb2_grpc.EchoServiceStub)))
            relay_address = f"127.0.0.1:{relay.bind('127.0.0.1:0')}"
            servers.append(relay)
            await relay.start()
            async with rpcframe.aio.connect(relay_address, config) as channel:
                answer = await channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="whoami"))
    finally:
        for server in reversed(servers):
            await server.stop(0)
    assert answer.message == "backend"
    _assert_three_hops(otel.finished())


def test_a_retried_call_shows_both_attempts(otel: Telemetry) -> None:
    backends = [Backend(name) for name in "ab"]
    backends[0].servicer.failing = True
    config = rpcframe.ChannelConfig(policy="round_robin", slow_start=0, default_timeout=10, observers=otel.observers)
    try:
        with rpcframe.connect([b.address for b in backends], config) as channel:
            wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(4):  # round robin: at least one call meets the failing backend first
                assert stub.Echo(pb.EchoRequest(message="whoami")).message == "b"
    finally:
        for backend in backends:
            backend.stop()
    spans = otel.finished()
    retried = [s for s in spans if (s.attributes or {}).get("rpcframe.attempts") == 2]
    assert retried, [(s.name, s.attributes) for s in spans]
    first, second = _attempts(spans, retried[0])
    assert (first.attributes or {})["rpcframe.attempt.reason"] == "first"
    assert (first.attributes or {})["rpc.grpc.status_code"] == 14  # UNAVAILABLE
    assert first.status.status_code is StatusCode.ERROR
    assert (second.attributes or {})["rpcframe.attempt.reason"] == "retry"
    assert (second.attributes or {})["rpc.grpc.status_code"] == 0
    assert first.attributes["server.port"] != second.attributes["server.port"]  # type: ignore[index]
    assert retried[0].status.status_code is StatusCode.UNSET


def test_server_span_names_an_authenticated_principal_never_the_key(otel: Telemetry) -> None:
    key = "k-0123456789abcdef"
    auth = AuthConfig(api_keys=ApiKeys.from_plain({"ci-bot": key}))
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1, auth=auth, observers=otel.observers))
    server.add(ScriptedEcho("s"))
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    token = StaticToken(key, scheme=None, key_name="x-api-key")
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(token=token, default_timeout=10)) as channel:
            assert channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="whoami")).message == "s"
    finally:
        server.stop(0)
    (span,) = otel.finished()
    assert span.kind is SpanKind.SERVER
    assert (span.attributes or {})["enduser.id"] == "ci-bot"
    assert (span.attributes or {})["rpcframe.auth.method"] == "api_key"
    assert not any(key in str(value) for value in (span.attributes or {}).values())


async def test_aio_hedged_call_shows_the_hedge_and_counts_it(otel: Telemetry, aio_server: Running) -> None:
    hedged = {ECHO: rpcframe.MethodConfig(hedge=rpcframe.HedgePolicy(delay=0.05))}
    config = rpcframe.ChannelConfig(observers=otel.observers, methods=hedged, default_timeout=10)
    async with rpcframe.aio.connect(aio_server.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(30):  # teach the method its latency (a few ms)
            await stub.Echo(pb.EchoRequest(message="x"))
        await stub.Echo(pb.EchoRequest(message="sleep:0.3"))  # slower than its p95: a hedge is sent
    spans = otel.finished()
    calls = [s for s in spans if s.parent is None]
    slow = max(calls, key=lambda s: s.end_time or 0)  # the sleeping call ended last
    first, hedge = _attempts(spans, slow)
    assert (hedge.attributes or {})["rpcframe.attempt.reason"] == "hedge"
    assert {(first.attributes or {})["rpc.grpc.status_code"], (hedge.attributes or {})["rpc.grpc.status_code"]} == {
        0, 1  # one answered, the other was cancelled
    }
    hedges = [s for s in spans if (s.attributes or {}).get("rpcframe.attempt.reason") == "hedge"]
    assert sum(p.value for p in otel.points("rpcframe.client.hedges")) == len(hedges) >= 1


STREAMS = 20


def test_sync_cancelled_streams_leave_no_open_span(otel: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    server, address = _server(ScriptedEcho("s"), otel.observers)
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(observers=otel.observers)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(STREAMS):
                stream = stub.Expand(pb.ExpandRequest(message="m", count=100_000), timeout=10)
                assert next(stream).index == 0
                stream.cancel()
            del stream  # the call ends when its caller drops it
            wait_until(lambda: otel.open_spans.open == 0)
    finally:
        server.stop(0)
    servers = [s for s in otel.finished() if s.kind is SpanKind.SERVER]
    assert len(servers) == STREAMS
    assert {(s.attributes or {})["rpc.grpc.status_code"] for s in otel.finished()} == {1}  # CANCELLED, both sides
    assert "detach" not in caplog.text


async def test_aio_cancelled_streams_leave_no_open_span(otel: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1, observers=otel.observers))
    server.add(AioScriptedEcho("s"))
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    await server.start()
    try:
        async with rpcframe.aio.connect(address, rpcframe.ChannelConfig(observers=otel.observers)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(STREAMS):
                stream = stub.Expand(pb.ExpandRequest(message="m", count=100_000), timeout=10)
                assert (await stream.read()).index == 0
                stream.cancel()
            del stream  # the call ends when its caller drops it

            async def closed() -> bool:
                return otel.open_spans.open == 0

            await eventually(closed)
    finally:
        await server.stop(0)
    servers = [s for s in otel.finished() if s.kind is SpanKind.SERVER]
    assert len(servers) == STREAMS
    assert {(s.attributes or {})["rpc.grpc.status_code"] for s in otel.finished()} == {1}  # CANCELLED, both sides
    assert "detach" not in caplog.text


# -- metrics ----------------------------------------------------------------------------


def test_a66_metrics_count_calls_and_name_only_known_methods(otel: Telemetry) -> None:
    calls = 5
    server, address = _server(ScriptedEcho("m"), otel.observers)
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(observers=otel.observers)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(calls):
                stub.Echo(pb.EchoRequest(message="x"), timeout=10)
            unknown = channel.unary_unary(
                "/rpcframe.echo.v1.EchoService/Nope", pb.EchoRequest.SerializeToString, pb.EchoResponse.FromString
            )
            with pytest.raises(rpcframe.Unimplemented):
                unknown(pb.EchoRequest(message="x"), timeout=10)
    finally:
        server.stop(0)
    started = [p for p in otel.points("grpc.client.attempt.started") if p.attributes["grpc.method"] == ECHO]
    assert sum(p.value for p in started) == calls
    assert started[0].attributes["grpc.target"] == address
    durations = [p for p in otel.points("grpc.server.call.duration") if p.attributes["grpc.method"] == ECHO]
    assert [(p.count, p.attributes["grpc.status"]) for p in durations] == [(calls, "OK")]
    assert durations[0].explicit_bounds[:3] == (0, 0.00001, 0.00005)  # A66's buckets
    attempts = otel.points("grpc.client.attempt.duration")
    other = [p for p in attempts if p.attributes["grpc.method"] == "other"]
    assert [(p.count, p.attributes["grpc.status"]) for p in other] == [(1, "UNIMPLEMENTED")]
    sent = [p for p in otel.points("grpc.client.attempt.sent_total_compressed_message_size")
            if p.attributes["grpc.method"] == ECHO]  # fmt: skip
    assert sent[0].count == calls
    assert sent[0].sum == calls * pb.EchoRequest(message="x").ByteSize()


def test_importing_rpcframe_does_not_import_opentelemetry() -> None:
    code = "import sys, rpcframe, rpcframe.aio; print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unsampled_call_records_no_span_but_still_passes_its_context_on() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    client, server_side = Telemetry(), Telemetry()
    client.tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    client.tracer_provider.add_span_processor(SimpleSpanProcessor(client.spans))
    client.observers = telemetry(client.tracer_provider, client.meter_provider)
    seen: list[str] = []

    class Headers(CallObserver):
        def call_received(self, call: ServerCallInfo) -> None:
            seen.extend(v for k, v in call.context.invocation_metadata() if k == "traceparent")

    server, address = _server(ScriptedEcho("u"), (*server_side.observers, Headers()))
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(observers=client.observers)) as channel:
            assert channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="whoami")).message == "u"
    finally:
        server.stop(0)
        for made in (client, server_side):
            made.tracer_provider.shutdown()
            made.meter_provider.shutdown()
    assert client.finished() == []
    assert server_side.finished() == []  # the server follows the caller's decision
    (traceparent,) = seen
    assert int(traceparent.rsplit("-", 1)[1], 16) & 1 == 0  # W3C flags: not sampled


def test_retried_attempt_spans_appear_only_when_a_call_is_retried() -> None:
    made = Telemetry()
    made.observers = telemetry(made.tracer_provider, made.meter_provider, attempt_spans="retried")
    backends = [Backend(name) for name in "ab"]
    backends[0].servicer.failing = True
    config = rpcframe.ChannelConfig(policy="round_robin", slow_start=0, default_timeout=10, observers=made.observers)
    try:
        with rpcframe.connect([b.address for b in backends], config) as channel:
            wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(4):  # round robin: calls meet the failing backend first
                assert stub.Echo(pb.EchoRequest(message="whoami")).message == "b"
        with rpcframe.connect(backends[1].address, config) as channel:  # answered by its first attempt
            assert channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="whoami")).message == "b"
    finally:
        for backend in backends:
            backend.stop()
        made.tracer_provider.shutdown()
        made.meter_provider.shutdown()
    spans = made.finished()
    calls = [s for s in spans if s.parent is None]
    assert len(calls) == 5
    once = [c for c in calls if (c.attributes or {})["rpcframe.attempts"] == 1]
    twice = [c for c in calls if (c.attributes or {})["rpcframe.attempts"] == 2]
    assert once
    assert twice
    for call in once:
        assert _attempts(spans, call) == []  # no attempt span for a call its first attempt answered
    first, second = _attempts(spans, twice[0])
    assert (first.attributes or {})["rpc.grpc.status_code"] == 14  # the failed first attempt, backdated
    assert twice[0].start_time <= first.start_time <= first.end_time <= second.start_time  # type: ignore[operator]
    assert (second.attributes or {})["rpcframe.attempt.reason"] == "retry"


def test_a_hedged_call_retried_after_a_failure_ends_ok_with_a_retry_attempt(otel: Telemetry) -> None:
    backends = [Backend(name) for name in "ab"]
    backends[0].servicer.failing = True
    hedged = {ECHO: rpcframe.MethodConfig(hedge=rpcframe.HedgePolicy(delay=1.0, max_extra_load=1.0))}
    config = rpcframe.ChannelConfig(policy="pick_first", slow_start=0, default_timeout=10, observers=otel.observers,
                                    methods=hedged)  # fmt: skip
    try:
        with rpcframe.connect([b.address for b in backends], config) as channel:
            wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
            assert channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="whoami")).message == "b"
    finally:
        for backend in backends:
            backend.stop()
    spans = otel.finished()
    call = _one(spans, SpanKind.CLIENT, None)
    assert call.status.status_code is StatusCode.UNSET  # the call succeeded, whatever its first copy did
    assert (call.attributes or {})["rpc.grpc.status_code"] == 0
    first, second = _attempts(spans, call)
    assert (first.attributes or {})["rpc.grpc.status_code"] == 14
    assert (second.attributes or {})["rpcframe.attempt.reason"] == "retry"  # sent after a failure, not beside it
    assert first.attributes["server.port"] != second.attributes["server.port"]  # type: ignore[index]
