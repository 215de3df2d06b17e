"""Deadlines carried across hops: one absolute monotonic time per call tree.

A deadline is created once at the edge (the first client call, or a
``with rpcframe.deadline_after(s):`` block) and travels as the ``grpc-timeout``
header. The server front turns the incoming timeout back into an absolute
deadline and stores it, with the rest of the incoming call's policy, in a
:class:`CallScope` held by a context variable: per thread for the sync server,
per task for asyncio. Every call made under that scope is bounded by it.

Pure: no grpc, no asyncio, time comes in as an argument.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "CallScope",
    "DeadlinePassed",
    "bounded_timeout",
    "current_scope",
    "deadline_scope",
    "scope_var",
]


class DeadlinePassed(Exception):
    """A call's deadline passed before it could be sent."""


class CallScope:
    """What calls made while handling one incoming call inherit from it.

    Attributes:
        deadline: absolute monotonic seconds, or ``None`` for no deadline.
        is_retry: the incoming call was itself a retry or hedge, so calls
            made under it are not retried again (no retry storms down a chain).
        root: the scope of the incoming call itself; a nested
            ``deadline_after`` block shortens the deadline but shares the
            root's outgoing calls, so cancellation still reaches them.
        calls: outgoing calls to cancel when the incoming call ends early
            (each has a ``cancel()`` method); ``None`` until one is started.
        cancelled: set once the incoming call ended early; calls started
            afterwards are cancelled at once.
        ended: set when the handler has returned; cancellation after that
            is the normal end of the call, not a reason to cancel anything.
    """

    __slots__ = ("_criticality", "_deadline", "_is_retry", "_parent_root", "_pending", "calls", "cancelled", "ended")

    def __init__(self, deadline: float | None, is_retry: bool = False, parent: CallScope | None = None) -> None:
        self._deadline = deadline
        self._is_retry = is_retry
        self._criticality: str | None = None if parent is None else parent.criticality
        self._pending = False  # a subclass sets it to fill the two fields in on first use
        # None for a root scope: a scope pointing at itself would be a
        # reference cycle, left to the garbage collector on every call.
        self._parent_root: CallScope | None = None if parent is None else parent.root
        self.calls: set[Any] | None = None
        self.cancelled = False
        self.ended = False

    @property
    def root(self) -> CallScope:
        """The scope of the incoming call itself (see the class docstring)."""
        parent_root = self._parent_root
        return self if parent_root is None else parent_root

    @property
    def deadline(self) -> float | None:
        """Absolute monotonic deadline in seconds, or ``None``."""
        if self._pending:
            self._resolve()
        return self._deadline

    @property
    def is_retry(self) -> bool:
        """Whether the incoming call was a retry or hedge (chain stop)."""
        if self._pending:
            self._resolve()
        return self._is_retry

    @property
    def criticality(self) -> str | None:
        """The incoming call's criticality (``rpcframe-criticality``), inherited by the calls it makes."""
        if self._pending:
            self._resolve()
        return self._criticality

    def _resolve(self) -> None:
        """Fill in ``_deadline``, ``_is_retry`` and ``_criticality`` (lazy subclasses override)."""
        self._pending = False

    def remaining(self, now: float) -> float | None:
        """Seconds left at ``now`` (may be negative), or ``None`` without deadline."""
        return None if self.deadline is None else self.deadline - now

    def track(self, call: Any) -> None:
        """Remember an outgoing call so :meth:`cancel_all` can reach it."""
        root = self.root
        if root is not self:
            root.track(call)
        elif self.cancelled:
            call.cancel()
        else:
            if self.calls is None:
                self.calls = set()
            self.calls.add(call)

    def untrack(self, call: Any) -> None:
        """Forget a call that has ended."""
        calls = self.root.calls
        if calls is not None:
            calls.discard(call)

    def cancel_all(self) -> None:
        """The incoming call ended early: cancel every outgoing call it started."""
        root = self.root
        if root.ended:
            return
        root.cancelled = True
        calls, root.calls = root.calls, None
        for call in calls or ():
            call.cancel()


scope_var: contextvars.ContextVar[CallScope | None] = contextvars.ContextVar("rpcframe_scope", default=None)


def current_scope() -> CallScope | None:
    """The scope of the incoming call being handled (or deadline block), if any."""
    return scope_var.get()


def bounded_timeout(timeout: float | None, deadline: float | None, now: float, margin: float) -> float | None:
    """The timeout an outgoing call is sent with under an inherited ``deadline``.

    The earlier of the call's own ``timeout`` and the inherited deadline less
    ``margin`` (time for the answer to travel back). Raises
    :class:`DeadlinePassed` when nothing is left, so the call is never sent.
    """
    if deadline is None:
        if timeout is not None and timeout <= 0:
            raise DeadlinePassed("the call's timeout is not positive")
        return timeout
    left = deadline - now
    if left <= margin:
        if left <= 0:
            # No figure: a server reports a passed deadline as 0 s left, so
            # how long ago it passed is not always known.
            raise DeadlinePassed("the deadline had passed before the call was sent")
        raise DeadlinePassed(f"only {left * 1000:.1f} ms of the deadline were left (margin {margin * 1000:.0f} ms)")
    left -= margin
    return left if timeout is None or timeout > left else timeout


@contextmanager
def deadline_scope(seconds: float, now: float) -> Iterator[CallScope]:
    """A block whose calls share one deadline ``seconds`` after ``now``.

    Inside a handler the block can only shorten the incoming deadline.
    """
    outer = scope_var.get()
    deadline = now + seconds
    if outer is not None and outer.deadline is not None and outer.deadline < deadline:
        deadline = outer.deadline
    scope = CallScope(deadline, outer is not None and outer.is_retry, outer)
    token = scope_var.set(scope)
    try:
        yield scope
    finally:
        scope_var.reset(token)
