"""An OTLP/gRPC trace receiver for tests, served by rpcframe itself.

It implements ``opentelemetry.proto.collector.trace.v1.TraceService/Export``
(the service OpenTelemetry's ``OTLPSpanExporter`` and any collector speak) on
a thread-pool :class:`rpcframe.Server` bound to ``127.0.0.1`` port 0, and keeps
every span it is sent as a :class:`ReceivedSpan`.

Public API:

- ``OtlpReceiver()``: not serving yet; ``start()`` (or ``with``) binds and
  starts it, ``stop()`` (or leaving the ``with``) stops it at once. Usable from
  sync and asyncio tests alike (it runs on its own threads).
- ``receiver.address``: ``"127.0.0.1:PORT"``; ``receiver.endpoint``:
  ``"http://127.0.0.1:PORT"``, for ``OTLPSpanExporter(endpoint=...,
  insecure=True)``; ``receiver.environ``: the ``OTEL_*`` variables that point
  a process's OTLP/gRPC trace export (e.g. ``rpcframe serve``) at it.
- ``receiver.spans()``: a snapshot of the spans received so far, in arrival
  order; ``receiver.exports``: how many Export requests arrived.
- ``receiver.wait_for(predicate, timeout)``: block until
  ``predicate(spans)`` holds (checked on every Export, no polling) and return
  the spans; ``TimeoutError`` after ``timeout`` seconds.

A fixture is a ``with``::

    @pytest.fixture
    def receiver() -> Iterator[OtlpReceiver]:
        with OtlpReceiver() as started:
            yield started

Exporters batch: flush them (``TracerProvider.force_flush()``, which returns
once the receiver answered) before waiting, or wait long enough for the batch
delay of a process you do not control.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.trace import SpanKind, StatusCode

import rpcframe

__all__ = ["OtlpReceiver", "ReceivedSpan"]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as an exporter sent it; ids are lowercase hex (trace 32, span 16 characters)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None  #: None for a root span
    name: str
    kind: SpanKind  #: OTLP's SPAN_KIND_UNSPECIFIED reads as INTERNAL, as the OTLP spec says
    service: str | None  #: the resource's ``service.name``
    attributes: Mapping[str, Any]
    status: StatusCode


def _value(value: common_pb2.AnyValue) -> Any:
    """A Python value for an OTLP AnyValue (arrays as tuples, key/value lists as dicts)."""
    which = value.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None if which is None else getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _kind(kind: int) -> SpanKind:
    name = trace_pb2.Span.SpanKind.Name(kind).removeprefix("SPAN_KIND_")  # type: ignore[arg-type]
    return SpanKind.INTERNAL if name == "UNSPECIFIED" else SpanKind[name]


def _spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of an Export request, with its resource's service name."""
    found = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(ReceivedSpan(
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None, name=span.name, kind=_kind(span.kind),
                    service=service, attributes=_attributes(span.attributes),
                    status=StatusCode(span.status.code),
                ))  # fmt: skip
    return found


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    """Export: hand the spans to the receiver and answer success (no partial rejection)."""

    def __init__(self, receive: Callable[[list[ReceivedSpan]], None]) -> None:
        self._receive = receive

    def Export(  # noqa: N802 - the generated servicer's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receive(_spans(request))
        return trace_service_pb2.ExportTraceServiceResponse()


_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class OtlpReceiver:
    """Collects the spans OTLP/gRPC exporters send it (see the module's docstring)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.exports = 0  #: Export requests received
        self._server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1))
        self._server.add(_TraceService(self._receive), trace_service_pb2_grpc.add_TraceServiceServicer_to_server)
        self.address = f"127.0.0.1:{self._server.bind('127.0.0.1:0')}"
        self.endpoint = f"http://{self.address}"

    @property
    def environ(self) -> dict[str, str]:
        """``OTEL_*`` variables sending a process's traces here over OTLP/gRPC (plaintext).

        Metrics and logs export are turned off: the receiver serves only the trace service.
        """
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
        }

    def _receive(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self.exports += 1
            self._changed.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        """The spans received so far, in arrival order."""
        with self._changed:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float) -> list[ReceivedSpan]:
        """The spans once ``predicate(spans)`` holds; TimeoutError (with what arrived) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = [(s.service, s.kind.name, s.name) for s in self._spans]
                    raise TimeoutError(f"spans not as expected within {timeout}s; received {got}")
                self._changed.wait(remaining)
            return list(self._spans)

    def start(self) -> OtlpReceiver:
        """Start serving; returns the receiver."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving at once (an export still in flight fails)."""
        self._server.stop(0)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
