"""`make demo`, fourth act: traces of a retried and a hedged call across a relay, and /metrics.

A client calls a relay whose handler calls a backend. First call: the
first backend fails once, so the relay's call is retried on the second.
Second call: the first backend is slow, so after 20 ms the relay hedges
to the second, which answers; the slow copy is cancelled. The spans,
recorded by OpenTelemetry's in-memory exporter, print as trees: client
call, attempt, relay server span, the relay's call with its attempts, each
reaching a backend's server span. Then the Prometheus text of the same
calls, from rpcframe's ``/metrics`` endpoint.
"""

from __future__ import annotations

import sys
import threading
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
    """Echoes; the first one fails its first call with UNAVAILABLE and is slow to answer "slow"."""

    def __init__(self, failures: int, slow: bool) -> None:
        super().__init__()
        self.failures, self.slow = failures, slow
        self.stop = threading.Event()

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        if self.failures:
            self.failures -= 1
            raise rpcframe.Unavailable("warming up")
        if self.slow and request.message == "slow":
            self.stop.wait(2)  # the hedge answers long before; cancelled, the call ends here
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
    servicers = [Backend(1, slow=True), Backend(0, slow=False)]
    backends = [_server(servicer, observers) for servicer in servicers]
    # Echo is NO_SIDE_EFFECTS in its contract, so it may be hedged: a backup after 20 ms.
    hedged = {"rpcframe.echo.v1.EchoService/Echo": rpcframe.MethodConfig(
        hedge=rpcframe.HedgePolicy(delay=0.02, max_extra_load=1.0))}  # fmt: skip
    config = rpcframe.ChannelConfig(policy="pick_first", slow_start=0, default_timeout=5, observers=observers,
                                    methods=hedged)  # fmt: skip
    downstream = rpcframe.connect([address for _, address in backends], config)
    relay, relay_address = _server(Relay(downstream), observers)
    endpoint, port = serve_metrics(0, registry=registry)
    try:
        downstream.wait_ready(10)
        answers = []
        with rpcframe.connect(relay_address, rpcframe.ChannelConfig(default_timeout=5, observers=observers)) as client:
            stub = client.stub(echo_pb2_grpc.EchoServiceStub)
            for message in ("traced", "slow"):
                answers.append(stub.Echo(pb.EchoRequest(message=message)).message)
                spans = list(exporter.get_finished_spans())
                exporter.clear()
                print(f"client -> relay {relay_address} -> backends {[a for _, a in backends]}: {answers[-1]!r}")
                print("\n".join(_tree(spans)) + "\n")
        servicers[0].stop.set()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        print(f"\nGET http://127.0.0.1:{port}/metrics (call counts and attempt latencies):")
        for line in text.splitlines():
            if line.startswith(("grpc_server_call_started_total", "grpc_client_attempt_started_total",
                                "grpc_client_attempt_duration_seconds_count")):  # fmt: skip
                print("  " + line)
        return 0 if answers == ["traced", "slow"] else 1
    finally:
        servicers[0].stop.set()
        endpoint.shutdown()
        downstream.close()
        for server, _ in [*backends, (relay, relay_address)]:
            server.stop(0)


if __name__ == "__main__":
    sys.exit(main())
