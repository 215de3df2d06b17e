"""Prometheus metrics on the observer seam, and a ``/metrics`` endpoint.

Needs the ``prometheus`` extra (``prometheus-client``). Names follow gRFC
A66 in Prometheus form (dots become underscores, units and ``_total``
suffixes as Prometheus names them)::

    observer = PrometheusObserver()                       # prometheus_client's default registry
    server = rpcframe.Server(rpcframe.ServerConfig(observers=(observer,)))
    serve_metrics(9464)                                   # GET http://127.0.0.1:9464/metrics

``rpcframe serve --metrics-port PORT`` does both. The method label is
bounded: methods the protobuf descriptor pool does not know count as
``other``.
"""

from __future__ import annotations

from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

from .observe import AttemptInfo, CallInfo, CallObserver, MethodLabels, ServerCallInfo

__all__ = ["PrometheusObserver", "serve_metrics"]

# gRFC A66's latency buckets, in seconds.
_LATENCY = (0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006,
            0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25,
            0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # fmt: skip


class PrometheusObserver(CallObserver):
    """Counts calls and attempts into Prometheus metrics (A66 names), client and server side."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        client, server = ("grpc_method", "grpc_target"), ("grpc_method",)
        self._label = MethodLabels()
        self._attempts = Counter("grpc_client_attempt_started", "Client attempts started", client, registry=reg)
        self._attempt_duration = Histogram(
            "grpc_client_attempt_duration_seconds", "Client attempt latency", (*client, "grpc_status"),
            buckets=_LATENCY, registry=reg,
        )  # fmt: skip
        self._call_duration = Histogram(
            "grpc_client_call_duration_seconds", "Client call latency, all attempts", (*client, "grpc_status"),
            buckets=_LATENCY, registry=reg,
        )  # fmt: skip
        self._started = Counter("grpc_server_call_started", "Server calls started", server, registry=reg)
        self._server_duration = Histogram(
            "grpc_server_call_duration_seconds", "Server call latency", (*server, "grpc_status"),
            buckets=_LATENCY, registry=reg,
        )  # fmt: skip

    def attempt_started(self, call: CallInfo, attempt: AttemptInfo) -> None:
        self._attempts.labels(self._label(call.method), call.target).inc()

    def attempt_ended(self, call: CallInfo, attempt: AttemptInfo, status: grpc.StatusCode, latency: float) -> None:
        self._attempt_duration.labels(self._label(call.method), call.target, status.name).observe(latency)

    def call_ended(self, call: CallInfo, status: grpc.StatusCode, attempts: int, latency: float) -> None:
        self._call_duration.labels(self._label(call.method), call.target, status.name).observe(latency)

    def call_received(self, call: ServerCallInfo) -> None:
        self._started.labels(self._label(call.method)).inc()

    def call_finished(self, call: ServerCallInfo, status: grpc.StatusCode, latency: float) -> None:
        self._server_duration.labels(self._label(call.method), status.name).observe(latency)


def serve_metrics(port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> tuple[Any, int]:
    """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread; returns (server, port).

    Stop it with ``server.shutdown()``.
    """
    server, _thread = start_http_server(port, host, registry=REGISTRY if registry is None else registry)
    return server, int(server.server_port)
