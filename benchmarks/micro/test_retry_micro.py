"""Micro-benchmarks of the per-call work deadlines and retries add.

::

    .venv/bin/python -m pytest benchmarks/micro/test_retry_micro.py --benchmark-only -q

Every call deposits into the retry budget; calls made inside a handler also
bound their timeout by the inherited deadline. Failures (retry decisions)
are off the fast path and not measured here.
"""

from __future__ import annotations

import time

from rpcframe._core.budget import BudgetConfig, RateBudget
from rpcframe._core.deadline import CallScope, bounded_timeout, scope_var
from rpcframe._core.hedge import LatencyWindow


def test_budget_deposit(benchmark) -> None:  # type: ignore[no-untyped-def]
    budget = RateBudget(BudgetConfig())
    benchmark(lambda: budget.deposit(time.monotonic()))


def test_inherited_deadline(benchmark) -> None:  # type: ignore[no-untyped-def]
    token = scope_var.set(CallScope(time.monotonic() + 3600))

    def bound() -> None:
        scope = scope_var.get()
        assert scope is not None
        bounded_timeout(1.0, scope.deadline, time.monotonic(), 0.005)

    try:
        benchmark(bound)
    finally:
        scope_var.reset(token)


def test_scope_track_untrack(benchmark) -> None:  # type: ignore[no-untyped-def]
    scope = CallScope(None)
    call = object()

    def track() -> None:
        scope.track(call)
        scope.untrack(call)

    benchmark(track)


def test_latency_window_add(benchmark) -> None:  # type: ignore[no-untyped-def]
    window = LatencyWindow(0.95)
    benchmark(lambda: window.add(0.001))
