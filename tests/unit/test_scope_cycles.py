"""Incoming-call scopes are freed by reference counting, not left to the garbage collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from rpcframe._core.deadline import CallScope, deadline_scope, scope_var
from rpcframe.server._common import IncomingScope


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The collector off, and nothing collectable left from before."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_scope_per_call_leaves_no_reference_cycle(no_collector: None) -> None:
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
    assert gc.collect() == 0


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
