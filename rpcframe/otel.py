"""OpenTelemetry traces and gRFC A66 metrics for rpcframe calls, on the observer seam.

Needs the ``otel`` extra (``pip install 'rpcframe[otel]'``); ``import rpcframe``
never imports OpenTelemetry, only importing this module does::

    from rpcframe.otel import telemetry

    observers = telemetry()                      # the global providers, or pass your own
    channel = rpcframe.connect(target, rpcframe.ChannelConfig(observers=observers))
    server = rpcframe.Server(rpcframe.ServerConfig(observers=observers))

:class:`TracingObserver` makes a CLIENT span per call with a child span per
attempt (number, reason, endpoint), sends the call span's W3C
``traceparent``/``tracestate`` with every attempt through the global
propagator, and makes a SERVER span per incoming call, child of the caller's,
that is the current OpenTelemetry context while the handler runs, so the
handler's own outgoing calls join the trace (sync and asyncio).

:class:`MetricsObserver` records the gRFC A66 instruments (``grpc.client.*``,
``grpc.server.*``) with A66's bucket boundaries, A96's retry counts and
rpcframe's hedges. ``grpc.method`` names only methods found in the protobuf
descriptor pool (generated code registers them); anything else is
``"other"``, so a caller cannot grow the label set.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .balancing.endpoint import backend_address
from .errors import ConfigError
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

__all__ = ["MetricsObserver", "Telemetry", "TracingObserver", "from_environment", "telemetry"]

_SCOPE = "rpcframe"
_OK = grpc.StatusCode.OK
_ERROR = StatusCode.ERROR

#: Codes that make a SERVER span an error (OpenTelemetry RPC conventions); a
#: CLIENT span is an error for every code but OK.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})  # fmt: skip

#: gRFC A66's bucket boundaries for latencies (s) and sizes (bytes); A96's for retries.
LATENCY_BUCKETS = (
    0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008,
    0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4,
    0.5, 0.65, 0.8, 1, 2, 5, 10, 20, 50, 100,
)  # fmt: skip
SIZE_BUCKETS = (
    0, 1024, 2048, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864, 268435456,
    1073741824, 4294967296,
)  # fmt: skip
RETRY_BUCKETS = (1, 2, 3, 4, 5)

#: Every instrument: (attribute, name, unit, histogram buckets or None for a counter, description).
INSTRUMENTS: tuple[tuple[str, str, str, Sequence[float] | None, str], ...] = (
    ("_attempt_started", "grpc.client.attempt.started", "{attempt}", None,
     "Attempts started, including retries, failovers and hedges."),
    ("_attempt_duration", "grpc.client.attempt.duration", "s", LATENCY_BUCKETS,
     "From an attempt's start to its end."),
    ("_attempt_sent", "grpc.client.attempt.sent_total_compressed_message_size", "By", SIZE_BUCKETS,
     "Request bytes per attempt (rpcframe: the serialized unary request, before compression)."),
    ("_attempt_rcvd", "grpc.client.attempt.rcvd_total_compressed_message_size", "By", SIZE_BUCKETS,
     "Response bytes per attempt (rpcframe: the serialized unary response, after decompression)."),
    ("_call_duration", "grpc.client.call.duration", "s", LATENCY_BUCKETS,
     "From the call's start to its end, over all its attempts."),
    ("_retries", "grpc.client.call.retries", "{retry}", RETRY_BUCKETS,
     "Retries of a call that was retried (A96)."),
    ("_transparent", "grpc.client.call.transparent_retries", "{transparent_retry}", RETRY_BUCKETS,
     "Attempts sent elsewhere because the previous one provably never ran (rpcframe failovers; A96)."),
    ("_hedges", "rpcframe.client.hedges", "{hedge}", None, "Hedged attempts sent."),
    ("_hedge_wins", "rpcframe.client.hedge_wins", "{hedge}", None, "Calls a hedge answered first."),
    ("_retry_delay", "grpc.client.call.retry_delay", "s", LATENCY_BUCKETS,
     "Time a retried call spent between attempts, waiting to send the next one (A96)."),
    ("_server_started", "grpc.server.call.started", "{call}", None, "Incoming calls that reached a handler."),
    ("_server_duration", "grpc.server.call.duration", "s", LATENCY_BUCKETS,
     "From the call's arrival in the server's wrapper to its handler's end."),
    ("_server_sent", "grpc.server.call.sent_total_compressed_message_size", "By", SIZE_BUCKETS,
     "Response bytes per call (rpcframe: the serialized unary response, before compression)."),
    ("_server_rcvd", "grpc.server.call.rcvd_total_compressed_message_size", "By", SIZE_BUCKETS,
     "Request bytes per call (rpcframe: the serialized unary request, after decompression)."),
)  # fmt: skip

#: rpcframe's state, read when metrics are collected (observable instruments):
#: (name, unit, "counter" or "gauge", description).
STATE_INSTRUMENTS: tuple[tuple[str, str, str, str], ...] = (
    ("rpcframe.client.budget_refusals", "{attempt}", "counter",
     "Retries and hedges the retry or hedging budget did not allow (attribute grpc.target)."),
    ("rpcframe.client.throttled", "{attempt}", "counter",
     "Attempts client-side throttling refused locally, unsent (attribute grpc.target)."),
    ("rpcframe.client.endpoint.ejections", "{ejection}", "counter",
     "Times outlier detection ejected an endpoint (grpc.target, rpcframe.endpoint)."),
    ("rpcframe.client.endpoint.state", "1", "gauge",
     "1 for an endpoint's current state, 0 for the others (grpc.target, rpcframe.endpoint, rpcframe.state)."),
    ("rpcframe.client.endpoint.in_flight", "{call}", "gauge",
     "Calls started on an endpoint and not ended (grpc.target, rpcframe.endpoint)."),
    ("rpcframe.server.in_flight", "{call}", "gauge", "Calls whose handler is running, over the process's servers."),
    ("rpcframe.server.auth.denials", "{call}", "counter",
     "Calls refused by authentication or policy (rpcframe.reason: missing, malformed, invalid, expired, denied)."),
    ("rpcframe.server.shed", "{call}", "counter",
     "Calls refused unrun by overload protection or rate limits (rpcframe.reason: concurrency, queue, priority, "
     "deadline, rate_limit)."),
)  # fmt: skip

#: Attribute names per instrument family (A66).
_CLIENT = ("grpc.method", "grpc.target")
_CLIENT_STATUS = ("grpc.method", "grpc.target", "grpc.status")
_SERVER = ("grpc.method",)
_SERVER_STATUS = ("grpc.method", "grpc.status")

_MAX_UNKNOWN = 1024  # method names remembered as "other"; past that they are looked up each time


def _version() -> str:
    from . import __version__

    return __version__


# -- names ------------------------------------------------------------------------


def _split_method(method: str) -> tuple[str, str, str]:
    """``"/pkg.Service/Method"`` -> (``"pkg.Service/Method"``, ``"pkg.Service"``, ``"Method"``)."""
    name = method[1:] if method.startswith("/") else method
    service, _, short = name.rpartition("/")
    return name, service, short


def _split_address(endpoint: str) -> tuple[str, int | None]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); a port that is not a number is None."""
    host, sep, port = endpoint.rpartition(":")
    if not sep:
        return endpoint, None
    return host.strip("[]"), int(port) if port.isdigit() else None


# -- traces -------------------------------------------------------------------------


class _MetadataGetter(Getter[Any]):
    """Reads propagation headers from grpc's invocation metadata (a sequence of key/value pairs)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = [value for k, value in carrier if k == key and isinstance(value, str)]
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


class TracingObserver(CallObserver):
    """OpenTelemetry spans for calls on both fronts (see the module's docstring).

    Args:
        tracer_provider: where spans go; None: the global provider
            (``opentelemetry.trace.set_tracer_provider``).
        principal: record an authenticated caller's name on server spans as
            ``enduser.id`` (and how it was authenticated as
            ``rpcframe.auth.method``); never a credential.
        attempt_spans: ``"always"`` (default): a span per attempt, the
            server span its child. ``"retried"``: a call answered by its first
            attempt has only its call span (the server span its child), about
            half the client's tracing cost; once a retry, failover or hedge
            follows, every attempt gets its span, the first one backdated to
            when it was sent (its server span stays the call span's child).
    """

    def __init__(
        self, tracer_provider: trace.TracerProvider | None = None, *, principal: bool = True,
        attempt_spans: str = "always",
    ) -> None:  # fmt: skip
        if attempt_spans not in ("always", "retried"):
            raise ValueError(f"attempt_spans must be 'always' or 'retried', got {attempt_spans!r}")
        self._tracer = trace.get_tracer(_SCOPE, _version(), tracer_provider)
        self._principal = principal
        self._lazy = attempt_spans == "retried"
        self._names: dict[str, tuple[str, dict[str, Any]]] = {}
        # A call's attempt spans not ended yet: the seam does not end the attempt of a
        # stream its caller cancels or drops, so call_ended ends what is left.
        self._open = object()
        # attempt_spans="retried": the first attempt while it has no span, and how it ended.
        self._first, self._first_end = object(), object()

    def _name(self, method: str) -> tuple[str, dict[str, Any]]:
        """The span name and the RPC attributes of ``method`` (cached: spans copy attributes)."""
        found = self._names.get(method)
        if found is None:
            name, service, short = _split_method(method)
            found = name, {"rpc.system": "grpc", "rpc.service": service, "rpc.method": short}
            if len(self._names) < _MAX_UNKNOWN:
                self._names[method] = found
        return found

    # client

    def call_started(self, call: CallInfo) -> None:
        """Start the call's span, child of the caller's current context."""
        name, attributes = self._name(call.method)
        span = self._tracer.start_span(name, otel_context.get_current(), SpanKind.CLIENT, attributes)
        call.slots[self] = span
        call.slots[self._open] = []

    def attempt_started(self, call: CallInfo, attempt: AttemptInfo) -> None:
        """Start the attempt's span under the call's."""
        span = call.slots.get(self)
        if span is None:
            return
        if not span.is_recording():
            # Not sampled: its attempts would not be either; pass the call's
            # context on (with its "not sampled" flag) and skip their spans.
            _inject(attempt, span)
            return
        if self._lazy:
            if attempt.number == 1:
                call.slots[self._first] = attempt
                _inject(attempt, span)
                return
            self._backdate_first(call, span)
        attempt_span = self._attempt_span(call, span, attempt)
        attempt.slots[self] = attempt_span
        call.slots[self._open].append(attempt_span)
        _inject(attempt, attempt_span)  # the server span becomes the attempt's child

    def _attempt_span(self, call: CallInfo, span: Span, attempt: AttemptInfo, start: int | None = None) -> Span:
        name, attributes = self._name(call.method)
        host, port = _split_address(backend_address(attempt.endpoint))
        attributes = {
            **attributes, "server.address": host, "rpcframe.attempt": attempt.number,
            "rpcframe.attempt.reason": attempt.reason,
        }  # fmt: skip
        if port is not None:
            attributes["server.port"] = port
        return self._tracer.start_span(
            name, trace.set_span_in_context(span), SpanKind.CLIENT, attributes, start_time=start
        )  # fmt: skip

    def _backdate_first(self, call: CallInfo, span: Span) -> None:
        """attempt_spans="retried": a second attempt starts, so the first one gets its span after all."""
        first = call.slots.pop(self._first, None)
        if first is None:
            return
        first_span = self._attempt_span(call, span, first, _epoch_ns(first.start))
        ended = call.slots.pop(self._first_end, None)
        if ended is None:  # still running (a hedge started beside it)
            first.slots[self] = first_span
            call.slots[self._open].append(first_span)
        else:
            status, latency = ended
            _end(first_span, status, status is not _OK, _epoch_ns(first.start + latency))

    def attempt_ended(self, call: CallInfo, attempt: AttemptInfo, status: grpc.StatusCode, latency: float) -> None:
        """End the attempt's span with its status."""
        span = attempt.slots.pop(self, None)
        if span is not None:
            call.slots[self._open].remove(span)
            _end(span, status, status is not _OK)
        elif self._lazy and call.slots.get(self._first) is attempt:
            call.slots[self._first_end] = status, latency  # for its span, should a retry follow

    def call_ended(self, call: CallInfo, status: grpc.StatusCode, attempts: int, latency: float) -> None:
        """End the call's span with its status and attempt count (and any attempt span left open)."""
        span = call.slots.pop(self, None)
        if span is None or not span.is_recording():
            return
        status = _cancelled_or(status, None)  # a stream its caller cancelled or dropped
        for left in call.slots.pop(self._open):
            _end(left, status, status is not _OK)
        span.set_attribute("rpcframe.attempts", attempts)
        _end(span, status, status is not _OK)

    # server

    def call_received(self, call: ServerCallInfo) -> None:
        """Start the server span, child of the caller's trace context, and make it current for the handler."""
        name, attributes = self._name(call.method)
        parent = propagate.extract(call.context.invocation_metadata() or (), otel_context.Context(), _GETTER)
        span = self._tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        if self._principal and span.is_recording():
            identity = call.identity
            if identity.method != "none" and identity.principal is not None:
                span.set_attribute("enduser.id", identity.principal)
                span.set_attribute("rpcframe.auth.method", identity.method)
        # call_received and call_finished run on the handler's thread (sync) or task (asyncio).
        call.slots[self] = span, otel_context.attach(trace.set_span_in_context(span, parent))

    def call_finished(self, call: ServerCallInfo, status: grpc.StatusCode, latency: float) -> None:
        """End the server span and restore the context the handler's thread or task had."""
        entry = call.slots.pop(self, None)
        if entry is None:
            return
        span, token = entry
        if span.is_recording():
            status = _cancelled_or(status, call.context)
            _end(span, status, status in _SERVER_ERRORS)
        _detach(token)


def _inject(attempt: AttemptInfo, span: Span) -> None:
    """Send ``span``'s trace context with the attempt (through the global propagator)."""
    headers: dict[str, str] = {}
    propagate.inject(headers, trace.set_span_in_context(span))
    for key, value in headers.items():
        attempt.add_metadata(key, value)


def _cancelled_or(status: grpc.StatusCode, context: Any) -> grpc.StatusCode:
    """CANCELLED for a call cancelled by its client, which the seam reports as UNKNOWN; else ``status``.

    A stream whose client cancelled or dropped it is closed with
    GeneratorExit (or CancelledError), on the server's wrapper and in the
    client's flow alike, which the seam maps to UNKNOWN; observers are called
    from their ``finally``, so that exception is still the one being
    handled. A thread-pool server's context also says it is no longer active.
    """
    if status is not grpc.StatusCode.UNKNOWN:
        return status
    if isinstance(sys.exc_info()[1], GeneratorExit | asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    is_active = getattr(context, "is_active", None)
    return grpc.StatusCode.CANCELLED if callable(is_active) and not is_active() else status


def _end(span: Span, status: grpc.StatusCode, error: bool, end_time: int | None = None) -> None:
    span.set_attribute("rpc.grpc.status_code", status.value[0])
    if error:
        span.set_status(Status(_ERROR, status.name))
    span.end(end_time)


def _epoch_ns(perf: float) -> int:
    """A ``time.perf_counter()`` reading as epoch nanoseconds (what span timestamps are)."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


def _detach(token: Any) -> None:
    """Undo an attach; quietly skip it when a streaming handler is finalized in another context.

    (``opentelemetry.context.detach`` logs a traceback for that case; with
    the default contextvars runtime the token resets its variable itself.)
    """
    if isinstance(token, contextvars.Token):
        try:
            token.var.reset(token)
        except ValueError:
            pass  # created in another Context: nothing of ours is current here
    else:
        otel_context.detach(token)


# -- metrics ------------------------------------------------------------------------


class _Counts:
    """A counter rpcframe keeps and the SDK reads when it collects (an observable counter).

    Adding is a dict update under a lock instead of an SDK call, which costs
    several µs (the SDK validates and hashes the attributes of every measurement).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, list[Any]] = {}  # id(attributes) -> [attributes, count]; attributes are cached

    def add(self, amount: int, attributes: dict[str, str]) -> None:
        """Add ``amount`` for ``attributes`` (one of the observer's cached dicts)."""
        with self._lock:
            entry = self._counts.get(id(attributes))
            if entry is None:
                self._counts[id(attributes)] = [attributes, amount]
            else:
                entry[1] += amount

    def observe(self, options: CallbackOptions) -> list[Observation]:
        """The SDK's callback: every count so far (cumulative)."""
        with self._lock:
            return [Observation(count, attributes) for attributes, count in self._counts.values()]



class MetricsObserver(CallObserver):
    """gRFC A66 (and A96) metrics for calls on both fronts.

    Sizes: ``…sent_total_compressed_message_size`` and ``…rcvd…`` record the
    serialized (uncompressed) size of a unary request and response, which is
    what the seam knows; streams record no size.

    Args:
        meter_provider: where measurements go; None: the global provider
            (``opentelemetry.metrics.set_meter_provider``).
    """

    _attempt_started: _Counts
    _attempt_duration: metrics.Histogram
    _attempt_sent: metrics.Histogram
    _attempt_rcvd: metrics.Histogram
    _call_duration: metrics.Histogram
    _retries: metrics.Histogram
    _transparent: metrics.Histogram
    _hedges: _Counts
    _hedge_wins: _Counts
    _retry_delay: metrics.Histogram
    _server_started: _Counts
    _server_duration: metrics.Histogram
    _server_sent: metrics.Histogram
    _server_rcvd: metrics.Histogram

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter(_SCOPE, _version(), meter_provider)
        for attribute, name, unit, buckets, description in INSTRUMENTS:
            if buckets is None:
                instrument: Any = _Counts()
                meter.create_observable_counter(name, [instrument.observe], unit, description)
            else:
                instrument = meter.create_histogram(
                    name, unit, description, explicit_bucket_boundaries_advisory=buckets
                )  # fmt: skip
            setattr(self, attribute, instrument)
        self._state = StateReader()
        # In STATE_INSTRUMENTS' order:
        readers = (self._read_budget, self._read_throttled, self._read_ejections, self._read_states,
                   self._read_in_flight, self._read_server_in_flight, self._read_denials, self._read_shed)  # fmt: skip
        for (name, unit, kind, description), read in zip(STATE_INSTRUMENTS, readers, strict=True):
            create = meter.create_observable_counter if kind == "counter" else meter.create_observable_gauge
            create(name, [read], unit, description)
        self._label = MethodLabels()
        self._attrs: dict[tuple[Any, ...], dict[str, str]] = {}
        # Per-call state in CallInfo.slots: retry and failover counts, the time waited between attempts.
        self._retry_key, self._failover_key, self._delay_key = object(), object(), object()

    # state, read at collection

    def channel_opened(self, channel: ObservedChannel) -> None:
        """Report the channel's budget refusals and endpoints from now on."""
        self._state.add_channel(channel)

    def server_opened(self, server: ObservedServer) -> None:
        """Report the server's in-flight calls and auth denials from now on."""
        self._state.add_server(server)

    def _read_budget(self, options: CallbackOptions) -> list[Observation]:
        return self._client_counter("budget_refused")

    def _read_throttled(self, options: CallbackOptions) -> list[Observation]:
        return self._client_counter("throttled")

    def _client_counter(self, counter: str) -> list[Observation]:
        counts = self._state.client_counters().items()
        return [Observation(n, {"grpc.target": target}) for (target, name), n in counts if name == counter]

    def _read_ejections(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(e.ejections, {"grpc.target": target, "rpcframe.endpoint": e.address})
            for target, e in self._state.endpoints()
        ]

    def _read_states(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(int(e.state == state), {"grpc.target": target, "rpcframe.endpoint": e.address,
                                                "rpcframe.state": state})
            for target, e in self._state.endpoints() for state in ENDPOINT_STATES
        ]  # fmt: skip

    def _read_in_flight(self, options: CallbackOptions) -> list[Observation]:
        return [
            Observation(e.in_flight, {"grpc.target": target, "rpcframe.endpoint": e.address})
            for target, e in self._state.endpoints()
        ]

    def _read_server_in_flight(self, options: CallbackOptions) -> list[Observation]:
        servers = self._state.servers()
        return [Observation(sum(s.inflight for s in servers))] if servers else []

    def _read_denials(self, options: CallbackOptions) -> list[Observation]:
        totals = self._state.server_totals(lambda server: server.auth_denials())
        return [Observation(n, {"rpcframe.reason": reason}) for reason, n in totals.items()]

    def _read_shed(self, options: CallbackOptions) -> list[Observation]:
        totals = self._state.server_totals(lambda server: server.shed())
        return [Observation(n, {"rpcframe.reason": reason}) for reason, n in totals.items()]

    def _attributes(self, names: tuple[str, ...], *values: str) -> dict[str, str]:
        """The attribute dict ``names`` -> ``values``; cached (labels are bounded).

        One dict per key even when threads race (``setdefault`` is atomic):
        :class:`_Counts` tells attribute sets apart by the dict's identity.
        """
        key = (names, *values)
        found = self._attrs.get(key)
        if found is None:
            found = self._attrs.setdefault(key, dict(zip(names, values, strict=True)))
        return found

    # client

    def attempt_started(self, call: CallInfo, attempt: AttemptInfo) -> None:
        """Count the attempt; count retries, failovers and hedges on the call."""
        attributes = self._attributes(_CLIENT, self._label(call.method), call.target)
        self._attempt_started.add(1, attributes)
        reason = attempt.reason
        if reason == "first":
            return
        if reason == "hedge":
            self._hedges.add(1, attributes)
            return
        slots = call.slots
        if reason == "failover":
            slots[self._failover_key] = slots.get(self._failover_key, 0) + 1
            return
        slots[self._retry_key] = slots.get(self._retry_key, 0) + 1
        delay = slots.get(self._delay_key)  # [when the failed attempt ended, time waited so far]
        if delay is not None:  # A96: the time with no attempt in flight, before this retry
            delay[1] += max(0.0, attempt.start - delay[0])

    def attempt_ended(self, call: CallInfo, attempt: AttemptInfo, status: grpc.StatusCode, latency: float) -> None:
        """Record the attempt's duration and message sizes."""
        attributes = self._attributes(_CLIENT_STATUS, self._label(call.method), call.target, status.name)
        self._attempt_duration.record(latency, attributes)
        sent = call.sent_bytes
        if sent is not None:
            self._attempt_sent.record(sent, attributes)
        received = attempt.received_bytes
        if received is None and status is not _OK:
            received = 0  # a failed attempt received no message
        if received is not None:
            self._attempt_rcvd.record(received, attributes)
        if status is _OK and attempt.reason == "hedge":
            self._hedge_wins.add(1, self._attributes(_CLIENT, self._label(call.method), call.target))
        elif status is not _OK:  # a retry may follow: remember when this attempt ended
            delay = call.slots.setdefault(self._delay_key, [0.0, 0.0])
            delay[0] = attempt.start + latency

    def call_ended(self, call: CallInfo, status: grpc.StatusCode, attempts: int, latency: float) -> None:
        """Record the call's duration and, when it was retried, its retry counts."""
        label = self._label(call.method)
        status = _cancelled_or(status, None)  # a stream its caller cancelled or dropped
        self._call_duration.record(latency, self._attributes(_CLIENT_STATUS, label, call.target, status.name))
        slots = call.slots
        if slots:
            retries, failovers = slots.get(self._retry_key), slots.get(self._failover_key)
            if retries:
                attributes = self._attributes(_CLIENT, label, call.target)
                self._retries.record(retries, attributes)
                self._retry_delay.record(slots.get(self._delay_key, (0.0, 0.0))[1], attributes)
            if failovers:
                self._transparent.record(failovers, self._attributes(_CLIENT, label, call.target))

    # server

    def call_received(self, call: ServerCallInfo) -> None:
        """Count the incoming call."""
        self._server_started.add(1, self._attributes(_SERVER, self._label(call.method)))

    def call_finished(self, call: ServerCallInfo, status: grpc.StatusCode, latency: float) -> None:
        """Record the incoming call's duration."""
        status = _cancelled_or(status, call.context)
        attributes = self._attributes(_SERVER_STATUS, self._label(call.method), status.name)
        self._server_duration.record(latency, attributes)
        received = call.received_bytes
        if received is not None:
            self._server_rcvd.record(received, attributes)
        sent = call.sent_bytes
        if sent is None and received is not None and status is not _OK:
            sent = 0  # a failed unary call sent no message
        if sent is not None:
            self._server_sent.record(sent, attributes)


def telemetry(
    tracer_provider: trace.TracerProvider | None = None, meter_provider: metrics.MeterProvider | None = None,
    *, attempt_spans: str = "always",
) -> tuple[CallObserver, ...]:  # fmt: skip
    """Tracing and metrics observers, for ``ChannelConfig(observers=...)`` and ``ServerConfig(observers=...)``."""
    return TracingObserver(tracer_provider, attempt_spans=attempt_spans), MetricsObserver(meter_provider)


# -- configured by the environment ---------------------------------------------------

#: Exporters :func:`from_environment` knows, per signal (OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER).
_EXPORTERS = ("otlp", "console", "none")


class Telemetry:
    """SDK providers :func:`from_environment` set up: the observers to use, and a :meth:`shutdown` that flushes."""

    def __init__(self, tracer_provider: Any | None, meter_provider: Any | None) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        observers: list[CallObserver] = []
        if tracer_provider is not None:
            observers.append(TracingObserver(tracer_provider))
        if meter_provider is not None:
            observers.append(MetricsObserver(meter_provider))
        self.observers: tuple[CallObserver, ...] = tuple(observers)

    def shutdown(self) -> None:
        """Export what is still buffered and stop the exporters (call once, at exit)."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.shutdown()


def _wanted(environ: Mapping[str, str], signal: str) -> str:
    """The exporter the environment asks for ``signal`` ("traces" or "metrics"): otlp, console or none.

    As the OpenTelemetry SDKs do, an explicit ``OTEL_<SIGNAL>_EXPORTER``
    decides; without it an OTLP endpoint (general or per signal) turns
    OTLP export on, and nothing set means none.
    """
    upper = signal.upper()
    name = environ.get(f"OTEL_{upper}_EXPORTER", "").strip().lower()
    if name:
        if name not in _EXPORTERS:
            raise ConfigError(f"OTEL_{upper}_EXPORTER={name!r}: rpcframe supports {', '.join(_EXPORTERS)}")
        return name
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT")
    return "otlp" if endpoint else "none"


def from_environment(environ: Mapping[str, str] | None = None) -> Telemetry | None:
    """Providers and exporters as the standard ``OTEL_*`` variables say; None when they ask for none.

    Reads ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER``
    and ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal endpoints) here;
    the SDK itself reads the rest (``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, headers, timeouts,
    ``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_BSP_*``). OTLP goes over gRPC
    (``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``, the only protocol installed by the
    ``otel`` extra). The providers become the global ones, so a handler's own
    spans join the call's trace. ``rpcframe serve`` calls this at start.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    traces, metrics_exporter = _wanted(env, "traces"), _wanted(env, "metrics")
    if traces == "none" and metrics_exporter == "none":
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip().lower()
    if "otlp" in (traces, metrics_exporter) and protocol != "grpc":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: rpcframe exports OTLP over grpc only")
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {"service.name": "rpcframe"})
    return Telemetry(_tracer_provider(traces, resource), _meter_provider(metrics_exporter, resource))


def _tracer_provider(exporter: str, resource: Any) -> Any | None:
    if exporter == "none":
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter: Any = OTLPSpanExporter()  # endpoint, headers, TLS, timeout: OTEL_EXPORTER_OTLP_*
    else:
        span_exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(span_exporter))  # OTEL_BSP_*
    trace.set_tracer_provider(provider)
    return provider


def _meter_provider(exporter: str, resource: Any) -> Any | None:
    if exporter == "none":
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        metric_exporter: Any = OTLPMetricExporter()
    else:
        metric_exporter = ConsoleMetricExporter()
    provider = MeterProvider([PeriodicExportingMetricReader(metric_exporter)], resource=resource)  # interval: env
    metrics.set_meter_provider(provider)
    return provider
