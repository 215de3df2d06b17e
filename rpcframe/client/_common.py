"""The per-call preparation both client fronts share.

Every call, of every kind, on both fronts, goes through one
:class:`MethodBase` subclass instance made once per stub method. Its
``_prepare`` is the single place where per-call policy is applied (today the
default timeout and channel metadata; balancing, deadline propagation,
retries and auth plug in here), so the fronts stay thin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import ChannelConfig

Metadata = Sequence[tuple[str, str | bytes]]


class MethodBase:
    """Shared state of one method's wrapper: the grpc multicallable and policy."""

    __slots__ = ("_call", "_metadata", "_timeout", "method")

    def __init__(self, method: str, call: Any, config: ChannelConfig) -> None:
        self.method = method
        self._call = call
        self._timeout = config.default_timeout
        self._metadata = config.metadata

    def _prepare(self, timeout: float | None, metadata: Metadata | None) -> tuple[float | None, Metadata | None]:
        """The timeout and metadata this call is sent with."""
        if timeout is None:
            timeout = self._timeout
        if self._metadata:
            metadata = self._metadata + tuple(metadata) if metadata else self._metadata
        return timeout, metadata
