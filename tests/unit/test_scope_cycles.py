"""Incoming-call scopes are freed by reference counting, not left to the garbage collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from rpcframe._core.deadline import CallScope, deadline_scope, scope_var
from rpcframe.server._common import IncomingScope


@pytest.fixture
def garbage() -> Iterator[list[object]]:
    """The collector off; what the test leaves in cycles is then found and kept in ``gc.garbage``."""
    gc.collect()
    gc.disable()
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_scope_per_call_leaves_no_reference_cycle(garbage: list[object]) -> None:
    # A server builds one per incoming call; a cycle would keep each one,
    # and the grpc context it holds, alive until a collection.
    for _ in range(200):
        scope = IncomingScope(context=object(), cap=None)
        assert scope.root is scope
        token = scope_var.set(scope)
        scope_var.reset(token)
        del scope
    for _ in range(200):
        CallScope(None)
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collection finds stays in gc.garbage for a look
    gc.collect()
    # Other threads of the process (servers of other tests) may leave cycles
    # meanwhile; none may be a scope.
    assert not [obj for obj in garbage if isinstance(obj, CallScope)]


class _Context:
    """What a scope reads of grpc's servicer context: no deadline, no metadata."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


def test_a_nested_block_shares_the_incoming_calls_root() -> None:
    incoming = IncomingScope(context=_Context(), cap=None)
    token = scope_var.set(incoming)
    try:
        with deadline_scope(1.0, now=0.0) as block, deadline_scope(0.5, now=0.0) as inner:
            assert block.root is incoming
            assert inner.root is incoming

            class Outgoing:
                cancelled = False

                def cancel(self) -> None:
                    self.cancelled = True

            call = Outgoing()
            inner.track(call)
            assert incoming.calls == {call}
            incoming.cancel_all()  # the incoming call ended early: its block's call is cancelled too
            assert call.cancelled
    finally:
        scope_var.reset(token)
