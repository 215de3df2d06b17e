"""`make demo`, fourth act: a trace of a retried call across a relay, and /metrics.

A client calls a relay whose handler calls a backend; the first backend
fails once, so the relay's call is retried on the second. The spans,
recorded by OpenTelemetry's in-memory exporter, print as a tree: client
call, attempt, relay server span, the relay's call with two attempts, each
reaching a backend's server span. Then the Prometheus text of the same
calls, from rpcframe's ``/metrics`` endpoint.
"""

from __future__ import annotations

import sys
import urllib.request
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import rpcframe
from examples.echo import EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.otel import TracingObserver
from rpcframe.prometheus import PrometheusObserver, serve_metrics


class Backend(EchoServicer):
    """Echoes; the first one fails its first call with UNAVAILABLE."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        if self.failures:
            self.failures -= 1
            raise rpcframe.Unavailable("warming up")
        return super().Echo(request, context)


class Relay(EchoServicer):
    """Passes each Echo on to the backends (the call inherits the trace and the deadline)."""

    def __init__(self, channel: rpcframe.Channel) -> None:
        super().__init__()
        self._stub = channel.stub(echo_pb2_grpc.EchoServiceStub)

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        return self._stub.Echo(request)  # type: ignore[no-any-return]


def _server(servicer: object, observers: tuple[Any, ...]) -> tuple[rpcframe.Server, str]:
    server = rpcframe.Server(rpcframe.ServerConfig(observers=observers))
    server.add(servicer)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    return server, address


def _tree(spans: list[ReadableSpan]) -> list[str]:
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            attrs = span.attributes or {}
            what = ""
            if "rpcframe.attempt" in attrs:
                what = (f"attempt {attrs['rpcframe.attempt']} ({attrs['rpcframe.attempt.reason']}) -> "
                        f"{attrs.get('server.address')}:{attrs.get('server.port')}")  # fmt: skip
            ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
            lines.append(f"{'  ' * depth}{span.kind.name.lower():<6} {span.name}  {what}  "
                         f"status {attrs.get('rpc.grpc.status_code')}  {ms:.1f} ms")  # fmt: skip
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return lines


def main() -> int:
    """Run the act; returns the process exit code."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing, registry = TracingObserver(provider), CollectorRegistry()
    metrics = PrometheusObserver(registry)
    observers = (tracing, metrics)
    backends = [_server(Backend(failures), observers) for failures in (1, 0)]
    config = rpcframe.ChannelConfig(policy="pick_first", slow_start=0, default_timeout=5, observers=observers)
    downstream = rpcframe.connect([address for _, address in backends], config)
    relay, relay_address = _server(Relay(downstream), observers)
    endpoint, port = serve_metrics(0, registry=registry)
    try:
        downstream.wait_ready(10)
        with rpcframe.connect(relay_address, rpcframe.ChannelConfig(default_timeout=5, observers=observers)) as client:
            answer = client.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="traced")).message
        print(f"client -> relay {relay_address} -> backends {[a for _, a in backends]}: {answer!r}\n")
        print("\n".join(_tree(list(exporter.get_finished_spans()))))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        print(f"\nGET http://127.0.0.1:{port}/metrics (call counts and attempt latencies):")
        for line in text.splitlines():
            if line.startswith(("grpc_server_call_started_total", "grpc_client_attempt_started_total",
                                "grpc_client_attempt_duration_seconds_count")):  # fmt: skip
                print("  " + line)
        return 0 if answer == "traced" else 1
    finally:
        endpoint.shutdown()
        downstream.close()
        for server, _ in [*backends, (relay, relay_address)]:
            server.stop(0)


if __name__ == "__main__":
    sys.exit(main())
