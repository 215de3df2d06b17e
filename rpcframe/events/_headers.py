"""What an event carries besides its payload: trace context, deadline, criticality, publisher, type.

The names are those of rpcframe's gRPC metadata where one exists, so one
vocabulary covers both transports. The deadline travels as an absolute Unix
time (``rpcframe-deadline``): unlike gRPC's relative ``grpc-timeout`` it must
survive the time an event waits in the stream.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .._core.deadline import deadline_scope, scope_var
from .._core.overload import CRITICALITY_KEY, check_criticality, criticality_var

__all__ = [
    "DEADLINE",
    "DEAD_DELIVERIES",
    "DEAD_GROUP",
    "DEAD_REASON",
    "DEAD_SUBJECT",
    "KEY",
    "MSG_ID",
    "PUBLISHER",
    "TYPE",
    "handler_context",
    "outgoing",
]

MSG_ID = "Nats-Msg-Id"
TYPE = "rpcframe-type"
PUBLISHER = "rpcframe-publisher"
DEADLINE = "rpcframe-deadline"
KEY = "rpcframe-key"
CRITICALITY = CRITICALITY_KEY
DEAD_REASON = "rpcframe-dead-reason"
DEAD_GROUP = "rpcframe-dead-group"
DEAD_DELIVERIES = "rpcframe-dead-deliveries"
DEAD_SUBJECT = "rpcframe-dead-subject"
_TRACE_KEYS = ("traceparent", "tracestate")

# The trace headers of the event being handled: a handler's own publishes forward them when
# OpenTelemetry is not installed (with it, the attached context does this).
_incoming_trace: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "rpcframe_event_trace", default=None
)

try:  # OpenTelemetry is optional (the otel extra): without it trace headers are only forwarded.
    from opentelemetry import context as _otel_context
    from opentelemetry import propagate as _otel_propagate
except ImportError:  # pragma: no cover - the dev extra installs it
    _otel_context = None  # type: ignore[assignment]
    _otel_propagate = None  # type: ignore[assignment]


def _trace_headers(headers: dict[str, str]) -> None:
    # An empty OpenTelemetry context (no span, no baggage) injects nothing: skip the propagators' work.
    if _otel_propagate is not None and _otel_context is not None and _otel_context.get_current():
        _otel_propagate.inject(headers)
    if "traceparent" not in headers:
        incoming = _incoming_trace.get()
        if incoming:
            headers.update(incoming)


def outgoing(type_name: str, publisher: str, ttl: float | None, inherit_deadline: bool) -> dict[str, str]:
    """Headers for an event published now, from the caller's context (handler, deadline block)."""
    headers = {TYPE: type_name, PUBLISHER: publisher}
    _trace_headers(headers)
    expires: float | None = None if ttl is None else time.time() + ttl
    scope = scope_var.get()
    if inherit_deadline and scope is not None and scope.deadline is not None:
        inherited = time.time() + (scope.deadline - time.monotonic())
        expires = inherited if expires is None else min(expires, inherited)
    if expires is not None:
        headers[DEADLINE] = f"{expires:.6f}"
    crit = criticality_var.get() or (scope.criticality if scope is not None else None)
    if crit:
        headers[CRITICALITY] = crit
    return headers


def remaining(headers: Mapping[str, str]) -> float | None:
    """Seconds left before the event's deadline (negative once passed); ``None`` without one."""
    raw = headers.get(DEADLINE)
    if raw is None:
        return None
    try:
        return float(raw) - time.time()
    except ValueError:
        return None  # a foreign publisher's malformed header is ignored, not fatal


@contextmanager
def handler_context(headers: Mapping[str, str], left: float | None) -> Iterator[None]:
    """Run a handler as the event's continuation: its trace, deadline and criticality."""
    if left is None and "traceparent" not in headers and CRITICALITY not in headers:
        yield  # nothing to carry over (the common case): no context variables to set
        return
    trace = {k: headers[k] for k in _TRACE_KEYS if k in headers}
    trace_token = _incoming_trace.set(trace or None)
    otel_token: Any = None
    if trace and _otel_propagate is not None and _otel_context is not None:
        otel_token = _otel_context.attach(_otel_propagate.extract(trace))
    crit_token = None
    crit = headers.get(CRITICALITY)
    if crit:
        try:
            crit_token = criticality_var.set(check_criticality(crit))
        except Exception:  # noqa: BLE001 - an unknown value from a foreign publisher is ignored
            crit_token = None
    try:
        if left is None:
            yield
        else:
            with deadline_scope(left, time.monotonic()):
                yield
    finally:
        if crit_token is not None:
            criticality_var.reset(crit_token)
        if otel_token is not None and _otel_context is not None:
            _otel_context.detach(otel_token)
        _incoming_trace.reset(trace_token)


def valid_group(group: str) -> bool:
    """A consumer group name JetStream accepts as a durable name."""
    return bool(group) and all(c.isalnum() or c in "_-" for c in group)
