"""OTLP end to end: a call's trace across 3 hops, as the real OTLP/gRPC exporter delivers it.

client -> A (relay) -> B (relay) -> C (leaf), on each front. Every hop has
its own SDK TracerProvider (resource ``service.name`` "client", "a", "b",
"c") exporting with ``OTLPSpanExporter`` through a ``BatchSpanProcessor`` to
:class:`tests.otlp_receiver.OtlpReceiver`, an rpcframe server implementing
OTLP's TraceService. The assertions read only what the receiver got, so
they cover W3C propagation between hops, the handler's context on each
front and the SDK's export of rpcframe's spans.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

import rpcframe
import rpcframe.aio
from examples.echo import AioEchoServicer, EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.observe import CallObserver
from rpcframe.otel import TracingObserver
from tests.cli import ServeProcess, assert_cli_error, run_cli
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.servicers import AioScriptedEcho, ScriptedEcho

ECHO = "rpcframe.echo.v1.EchoService/Echo"
CALLS = 2  # independent calls: two traces

#: The one chain each call makes, root first: (service, kind, is an attempt span).
CHAIN = (
    ("client", SpanKind.CLIENT, False), ("client", SpanKind.CLIENT, True),
    ("a", SpanKind.SERVER, False), ("a", SpanKind.CLIENT, False), ("a", SpanKind.CLIENT, True),
    ("b", SpanKind.SERVER, False), ("b", SpanKind.CLIENT, False), ("b", SpanKind.CLIENT, True),
    ("c", SpanKind.SERVER, False),
)  # fmt: skip


class Hops:
    """A TracerProvider per hop, exporting over OTLP to the receiver, and each hop's tracing observer."""

    def __init__(self, endpoint: str) -> None:
        self.providers: dict[str, TracerProvider] = {}
        self._observers: dict[str, tuple[CallObserver, ...]] = {}
        for service in ("client", "a", "b", "c"):
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=5)
            provider.add_span_processor(BatchSpanProcessor(exporter))
            self.providers[service] = provider
            self._observers[service] = (TracingObserver(tracer_provider=provider),)

    def channel_config(self, service: str) -> rpcframe.ChannelConfig:
        return rpcframe.ChannelConfig(observers=self._observers[service], default_timeout=5)

    def server_config(self, service: str) -> rpcframe.ServerConfig:
        return rpcframe.ServerConfig(grace_period=1, observers=self._observers[service])

    def flush(self) -> None:
        """Export every ended span now; force_flush returns once the receiver has answered."""
        for service, provider in self.providers.items():
            assert provider.force_flush(5000), f"{service}: spans not exported within 5 s"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


@pytest.fixture
def hops(receiver: OtlpReceiver) -> Iterator[Hops]:
    made = Hops(receiver.endpoint)
    yield made
    for provider in made.providers.values():
        provider.shutdown()


class Relay(EchoServicer):
    """Answers Echo by calling the next hop (inside the server span the observer made current)."""

    def __init__(self, channel: rpcframe.Channel) -> None:
        super().__init__()
        self._stub = channel.stub(echo_pb2_grpc.EchoServiceStub)

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        return self._stub.Echo(request)  # type: ignore[no-any-return]


class AioRelay(AioEchoServicer):
    """Answers Echo by calling the next hop (asyncio)."""

    def __init__(self, channel: rpcframe.aio.Channel) -> None:
        self._stub = channel.stub(echo_pb2_grpc.EchoServiceStub)

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        return await self._stub.Echo(request)  # type: ignore[no-any-return]


# -- checks ---------------------------------------------------------------------------


def _children(spans: list[ReceivedSpan]) -> dict[str | None, list[ReceivedSpan]]:
    found: dict[str | None, list[ReceivedSpan]] = {}
    for span in spans:
        found.setdefault(span.parent_span_id, []).append(span)
    return found


def _chain(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """The spans of one trace from its root, each the only child of the one before; all of them."""
    children = _children(spans)
    shown = [(s.service, s.kind.name, s.name, s.span_id, s.parent_span_id) for s in spans]
    (span,) = children.get(None, [None])
    assert span is not None, shown
    walked = [span]
    while span.span_id in children:
        assert len(children[span.span_id]) == 1, shown
        span = children[span.span_id][0]
        walked.append(span)
    assert len(walked) == len(spans), shown  # every span is on the chain: no orphan, no second root
    return walked


def _assert_call(spans: list[ReceivedSpan], ports: list[int]) -> None:
    """One call's trace: the 9-span chain through A, B and C; attempts went to ``ports`` in order."""
    walked = _chain(spans)
    assert [(s.service, s.kind, "rpcframe.attempt" in s.attributes) for s in walked] == list(CHAIN)
    for span in walked:
        assert span.name == ECHO
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "rpcframe.echo.v1.EchoService"
        assert span.attributes["rpc.method"] == "Echo"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.status is not StatusCode.ERROR
    attempts = [s for s in walked if "rpcframe.attempt" in s.attributes]
    assert [s.attributes["server.port"] for s in attempts] == ports
    for attempt in attempts:
        assert attempt.attributes["server.address"] == "127.0.0.1"
        assert attempt.attributes["rpcframe.attempt"] == 1
        assert attempt.attributes["rpcframe.attempt.reason"] == "first"
    for call in walked[0], walked[3], walked[6]:
        assert call.attributes["rpcframe.attempts"] == 1


def _assert_received(receiver: OtlpReceiver, hops: Hops, ports: list[int]) -> None:
    """After the calls: CALLS traces, each one chain, with nothing else exported."""
    hops.flush()
    expected = CALLS * len(CHAIN)
    spans = receiver.wait_for(lambda got: len(got) >= expected, timeout=5)
    assert len(spans) == expected, [(s.service, s.kind.name, s.name) for s in spans]
    traces: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    assert len(traces) == CALLS  # an independent call starts a trace of its own
    for trace_spans in traces.values():
        _assert_call(trace_spans, ports)


# -- the two fronts -------------------------------------------------------------------


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _sync_server(stack: contextlib.ExitStack, servicer: object, config: rpcframe.ServerConfig) -> str:
    server = rpcframe.Server(config)
    server.add(servicer)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    stack.callback(server.stop, 0)
    return address


def test_sync_three_hops_exported_over_otlp(receiver: OtlpReceiver, hops: Hops) -> None:
    with contextlib.ExitStack() as stack:
        address = _sync_server(stack, ScriptedEcho("c"), hops.server_config("c"))
        ports = [_port(address)]
        for hop in ("b", "a"):
            channel = stack.enter_context(rpcframe.connect(address, hops.channel_config(hop)))
            channel.wait_ready(5)  # the call's one attempt finds the next hop connected
            address = _sync_server(stack, Relay(channel), hops.server_config(hop))
            ports.insert(0, _port(address))
        with rpcframe.connect(address, hops.channel_config("client")) as channel:
            channel.wait_ready(5)
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            answers = [stub.Echo(pb.EchoRequest(message="whoami")).message for _ in range(CALLS)]
    assert answers == ["c"] * CALLS
    _assert_received(receiver, hops, ports)


async def _aio_server(stack: contextlib.AsyncExitStack, servicer: object, config: rpcframe.ServerConfig) -> str:
    server = rpcframe.aio.Server(config)
    server.add(servicer)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    await server.start()
    stack.push_async_callback(server.stop, 0)
    return address


async def test_aio_three_hops_exported_over_otlp(receiver: OtlpReceiver, hops: Hops) -> None:
    async with contextlib.AsyncExitStack() as stack:
        address = await _aio_server(stack, AioScriptedEcho("c"), hops.server_config("c"))
        ports = [_port(address)]
        for hop in ("b", "a"):
            channel = await stack.enter_async_context(rpcframe.aio.connect(address, hops.channel_config(hop)))
            async with asyncio.timeout(5):
                await channel.channel_ready()
            address = await _aio_server(stack, AioRelay(channel), hops.server_config(hop))
            ports.insert(0, _port(address))
        async with rpcframe.aio.connect(address, hops.channel_config("client")) as client:
            async with asyncio.timeout(5):
                await client.channel_ready()
            stub = client.stub(echo_pb2_grpc.EchoServiceStub)
            answers = [(await stub.Echo(pb.EchoRequest(message="whoami"))).message for _ in range(CALLS)]
    assert answers == ["c"] * CALLS
    # force_flush blocks until the receiver (on its own threads) answers: keep it off the event loop
    await asyncio.to_thread(_assert_received, receiver, hops, ports)


# -- serving generated code that predates registered method handlers ------------------
# (opentelemetry-proto's registers only a generic handler keyed by full paths)


class _Accepting(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(  # noqa: N802 - the generated servicer's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        return trace_service_pb2.ExportTraceServiceResponse()


def test_generated_add_function_without_registered_handlers_is_served() -> None:
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1))
    server.add(_Accepting(), trace_service_pb2_grpc.add_TraceServiceServicer_to_server)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(default_timeout=5)) as channel:
            stub = channel.stub(trace_service_pb2_grpc.TraceServiceStub)
            answer = stub.Export(trace_service_pb2.ExportTraceServiceRequest())
    finally:
        server.stop(0)
    assert not answer.HasField("partial_success")


# -- rpcframe serve, configured by OTEL_* alone -----------------------------------


def test_rpcframe_serve_exports_its_spans_as_the_otel_environment_says(receiver: OtlpReceiver) -> None:
    hops = Hops(receiver.endpoint)
    env = {**receiver.environ, "OTEL_SERVICE_NAME": "served", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    serve = ServeProcess("tests.servicers:tagged", "--bind", "127.0.0.1:0", env=env)
    try:
        with rpcframe.connect(serve.target, hops.channel_config("client")) as channel:
            channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="hi"))
        hops.flush()
        spans = receiver.wait_for(lambda got: any(s.service == "served" for s in got), timeout=10)
    finally:
        serve.terminate()
    served = [s for s in spans if s.service == "served"]
    attempt = next(s for s in spans if s.service == "client" and s.parent_span_id is not None)
    assert len(served) == 1
    assert served[0].kind is SpanKind.SERVER
    assert served[0].parent_span_id == attempt.span_id  # the caller's trace context crossed the process
    assert served[0].trace_id == attempt.trace_id
    assert served[0].attributes["rpc.method"] == "Echo"


def test_rpcframe_serve_refuses_an_exporter_it_does_not_have() -> None:
    result = run_cli("serve", "tests.servicers:tagged", "--bind", "127.0.0.1:0", env={"OTEL_TRACES_EXPORTER": "zipkin"})
    assert_cli_error(result, 2, "OTEL_TRACES_EXPORTER='zipkin'")
