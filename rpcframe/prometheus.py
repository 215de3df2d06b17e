"""Prometheus metrics on the observer seam, and a ``/metrics`` endpoint.

Needs the ``prometheus`` extra (``prometheus-client``). Names follow gRFC
A66/A96 in Prometheus form (dots become underscores, units and ``_total``
suffixes as Prometheus names them), beside rpcframe's own state::

    observer = PrometheusObserver()                       # prometheus_client's default registry
    server = rpcframe.Server(rpcframe.ServerConfig(observers=(observer,)))
    channel = rpcframe.connect(target, rpcframe.ChannelConfig(observers=(observer,)))
    serve_metrics(9464)                                   # GET http://127.0.0.1:9464/metrics

``rpcframe serve --metrics-port PORT`` does both for a server. The method
label is bounded: methods the protobuf descriptor pool does not know count
as ``other``. Endpoint state, in-flight calls, ejections, budget refusals
and auth denials are read from the channels and servers when Prometheus
scrapes, so calls pay nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .observe import (
    ENDPOINT_STATES,
    AttemptInfo,
    CallInfo,
    CallObserver,
    MethodLabels,
    ObservedChannel,
    ObservedServer,
    ServerCallInfo,
    StateReader,
)  # fmt: skip

__all__ = ["PrometheusObserver", "serve_metrics"]

# gRFC A66's bucket boundaries: latencies in seconds, sizes in bytes; A96's for retry counts.
_LATENCY = (0.0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006,
            0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25,
            0.3, 0.4, 0.5, 0.65, 0.8, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # fmt: skip
_SIZE = (0, 1024, 2048, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864, 268435456,
         1073741824, 4294967296)  # fmt: skip
_RETRIES = (1, 2, 3, 4, 5)
_OK = grpc.StatusCode.OK


class _State(Collector):
    """rpcframe's channel and server state, read at each scrape."""

    def __init__(self, state: StateReader) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        budget = CounterMetricFamily("rpcframe_client_budget_refusals", "Retries and hedges the budget refused",
                                     labels=("grpc_target",))  # fmt: skip
        throttled = CounterMetricFamily("rpcframe_client_throttled", "Attempts client throttling refused locally",
                                        labels=("grpc_target",))  # fmt: skip
        for (target, name), count in self._state.client_counters().items():
            if name == "budget_refused":
                budget.add_metric((target,), count)
            elif name == "throttled":
                throttled.add_metric((target,), count)
        endpoint = ("grpc_target", "rpcframe_endpoint")
        ejections = CounterMetricFamily("rpcframe_client_endpoint_ejections", "Outlier ejections", labels=endpoint)
        states = GaugeMetricFamily("rpcframe_client_endpoint_state", "1 for the endpoint's current state",
                                   labels=(*endpoint, "rpcframe_state"))  # fmt: skip
        in_flight = GaugeMetricFamily("rpcframe_client_endpoint_in_flight", "Calls in flight", labels=endpoint)
        for target, e in self._state.endpoints():
            ejections.add_metric((target, e.address), e.ejections)
            in_flight.add_metric((target, e.address), e.in_flight)
            for state in ENDPOINT_STATES:
                states.add_metric((target, e.address, state), int(e.state == state))
        yield from (budget, throttled, ejections, states, in_flight)
        servers = self._state.servers()
        if servers:
            yield GaugeMetricFamily("rpcframe_server_in_flight", "Calls whose handler is running",
                                    value=sum(s.inflight for s in servers))  # fmt: skip
        for name, doc, counts in (
            ("rpcframe_server_auth_denials", "Calls refused by auth or policy", lambda s: s.auth_denials()),
            ("rpcframe_server_shed", "Calls refused unrun by overload protection or rate limits", lambda s: s.shed()),
        ):
            family = CounterMetricFamily(name, doc, labels=("rpcframe_reason",))
            for reason, count in self._state.server_totals(counts).items():
                family.add_metric((reason,), count)
            yield family


class PrometheusObserver(CallObserver):
    """A66/A96 call metrics and rpcframe's state in Prometheus form, client and server side."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        client, server = ("grpc_method", "grpc_target"), ("grpc_method",)
        client_status, server_status = (*client, "grpc_status"), (*server, "grpc_status")
        self._label = MethodLabels()

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg)

        self._attempts = Counter("grpc_client_attempt_started", "Client attempts started", client, registry=reg)
        self._attempt_duration = histogram("grpc_client_attempt_duration_seconds", "Client attempt latency",
                                           client_status, _LATENCY)  # fmt: skip
        self._attempt_sent = histogram("grpc_client_attempt_sent_total_compressed_message_size_bytes",
                                       "Request bytes per attempt (serialized unary request)", client_status, _SIZE)
        self._attempt_rcvd = histogram("grpc_client_attempt_rcvd_total_compressed_message_size_bytes",
                                       "Response bytes per attempt (serialized unary response)", client_status, _SIZE)
        self._call_duration = histogram("grpc_client_call_duration_seconds", "Client call latency, all attempts",
                                        client_status, _LATENCY)  # fmt: skip
        self._retries = histogram("grpc_client_call_retries", "Retries of a retried call", client, _RETRIES)
        self._transparent = histogram("grpc_client_call_transparent_retries",
                                      "Attempts sent elsewhere because the previous one never ran", client, _RETRIES)
        self._hedges = Counter("rpcframe_client_hedges", "Hedged attempts sent", client, registry=reg)
        self._hedge_wins = Counter("rpcframe_client_hedge_wins", "Calls a hedge answered first", client, registry=reg)
        self._started = Counter("grpc_server_call_started", "Server calls started", server, registry=reg)
        self._server_duration = histogram("grpc_server_call_duration_seconds", "Server call latency",
                                          server_status, _LATENCY)  # fmt: skip
        self._server_sent = histogram("grpc_server_call_sent_total_compressed_message_size_bytes",
                                      "Response bytes per call (serialized unary response)", server_status, _SIZE)
        self._server_rcvd = histogram("grpc_server_call_rcvd_total_compressed_message_size_bytes",
                                      "Request bytes per call (serialized unary request)", server_status, _SIZE)
        self._state = StateReader()
        reg.register(_State(self._state))
        self._moves = object()  # per-call (retries, failovers) in CallInfo.slots

    def channel_opened(self, channel: ObservedChannel) -> None:
        """Report the channel's state from now on."""
        self._state.add_channel(channel)

    def server_opened(self, server: ObservedServer) -> None:
        """Report the server's state from now on."""
        self._state.add_server(server)

    def attempt_started(self, call: CallInfo, attempt: AttemptInfo) -> None:
        """Count the attempt (and a hedge, retry or failover)."""
        labels = self._label(call.method), call.target
        self._attempts.labels(*labels).inc()
        reason = attempt.reason
        if reason == "hedge":
            self._hedges.labels(*labels).inc()
        elif reason != "first":
            moves = call.slots.setdefault(self._moves, [0, 0])
            moves[reason == "failover"] += 1

    def attempt_ended(self, call: CallInfo, attempt: AttemptInfo, status: grpc.StatusCode, latency: float) -> None:
        """Record the attempt's latency and message sizes."""
        labels = self._label(call.method), call.target, status.name
        self._attempt_duration.labels(*labels).observe(latency)
        sent = call.sent_bytes
        if sent is not None:
            self._attempt_sent.labels(*labels).observe(sent)
            received = attempt.received_bytes
            self._attempt_rcvd.labels(*labels).observe(0 if received is None else received)
        if status is _OK and attempt.reason == "hedge":
            self._hedge_wins.labels(*labels[:2]).inc()

    def call_ended(self, call: CallInfo, status: grpc.StatusCode, attempts: int, latency: float) -> None:
        """Record the call's latency and retry counts."""
        label = self._label(call.method)
        self._call_duration.labels(label, call.target, status.name).observe(latency)
        moves = call.slots.get(self._moves) if call.slots else None
        if moves is not None:
            if moves[0]:
                self._retries.labels(label, call.target).observe(moves[0])
            if moves[1]:
                self._transparent.labels(label, call.target).observe(moves[1])

    def call_received(self, call: ServerCallInfo) -> None:
        """Count the incoming call."""
        self._started.labels(self._label(call.method)).inc()

    def call_finished(self, call: ServerCallInfo, status: grpc.StatusCode, latency: float) -> None:
        """Record the incoming call's latency and message sizes."""
        labels = self._label(call.method), status.name
        self._server_duration.labels(*labels).observe(latency)
        received = call.received_bytes
        if received is not None:
            self._server_rcvd.labels(*labels).observe(received)
            sent = call.sent_bytes
            self._server_sent.labels(*labels).observe(0 if sent is None else sent)


def serve_metrics(port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> tuple[Any, int]:
    """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread; returns (server, port).

    Stop it with ``server.shutdown()``.
    """
    server, _thread = start_http_server(port, host, registry=REGISTRY if registry is None else registry)
    return server, int(server.server_port)
