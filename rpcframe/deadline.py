"""Deadlines for user code: share one deadline across calls, ask what is left.

Inside a handler, calls inherit the incoming call's deadline on their own;
these helpers are for the edge of a call tree and for handlers that want to
know their budget::

    with rpcframe.deadline_after(0.5):      # every call in the block shares 500 ms
        user = users.Get(req)
        orders = orders.List(req)           # gets what the first call left

    left = rpcframe.time_remaining()        # inside a handler: seconds before the caller gives up
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from ._core.deadline import CallScope, deadline_scope, scope_var
from ._core.overload import check_criticality, criticality_var
from .errors import ConfigError

__all__ = ["criticality", "deadline_after", "time_remaining"]


@contextmanager
def deadline_after(seconds: float) -> Iterator[CallScope]:
    """Calls made in the ``with`` block (sync or asyncio) end within ``seconds``.

    Nested in a handler or another block, it can only shorten the deadline.
    """
    if seconds <= 0:
        raise ConfigError(f"deadline_after needs seconds > 0, got {seconds!r}")
    with deadline_scope(seconds, time.monotonic()) as scope:
        yield scope


def time_remaining() -> float | None:
    """Seconds left before the current deadline (handler or block); ``None`` without one."""
    scope = scope_var.get()
    if scope is None or scope.deadline is None:
        return None
    return max(0.0, scope.deadline - time.monotonic())


@contextmanager
def criticality(value: str) -> Iterator[str]:
    """Calls made in the ``with`` block (sync or asyncio) carry criticality ``value``.

    One of ``CRITICAL_PLUS``, ``CRITICAL`` (what calls without one count
    as), ``SHEDDABLE_PLUS`` or ``SHEDDABLE``: an overloaded rpcframe server
    refuses the least critical first. It overrides the incoming call's
    criticality, which a handler's calls otherwise inherit, and
    ``MethodConfig.criticality``.
    """
    token = criticality_var.set(check_criticality(value))
    try:
        yield criticality_var.get() or value
    finally:
        criticality_var.reset(token)
