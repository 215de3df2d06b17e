"""An access log on the observer seam: one JSON line per call, client or server side.

Off by default; add it to a config's observers::

    server = rpcframe.Server(rpcframe.ServerConfig(observers=(rpcframe.accesslog.AccessLog(),)))

Lines go to the ``rpcframe.access`` logger at INFO (configure its handler
as you like). Each carries the side, method, status, latency, the peer or
target, the caller's principal (server side, when authenticated), the
attempt count (client side) and the trace id when an OpenTelemetry span is
current. Never metadata values, so never tokens or keys.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import grpc

from .observe import CallInfo, CallObserver, ServerCallInfo

__all__ = ["AccessLog"]

LOGGER = logging.getLogger("rpcframe.access")


def _trace_id() -> str | None:
    """The current OpenTelemetry trace id, only when opentelemetry is already in use."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class AccessLog(CallObserver):
    """Writes one JSON line per ended call to ``logger`` (default ``rpcframe.access``)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or LOGGER

    def _write(self, record: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info("%s", json.dumps({k: v for k, v in record.items() if v is not None}))

    def call_ended(self, call: CallInfo, status: grpc.StatusCode, attempts: int, latency: float) -> None:
        """A client call ended."""
        self._write({
            "side": "client", "method": call.method, "status": status.name, "latency_ms": round(latency * 1000, 3),
            "target": call.target, "attempts": attempts, "trace_id": _trace_id(),
        })  # fmt: skip

    def call_received(self, call: ServerCallInfo) -> None:
        """Remember the trace id while the server span is current (it is gone when the call ends)."""
        call.slots[self] = _trace_id()

    def call_finished(self, call: ServerCallInfo, status: grpc.StatusCode, latency: float) -> None:
        """An incoming call ended."""
        identity = call.identity
        self._write({
            "side": "server", "method": call.method, "status": status.name, "latency_ms": round(latency * 1000, 3),
            "peer": call.context.peer(), "principal": identity.principal, "auth": identity.method,
            "trace_id": call.slots.get(self),
        })  # fmt: skip
