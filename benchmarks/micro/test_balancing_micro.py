"""Micro-benchmarks of balancing's per-call work: pick + done (budget: 5 µs at 10 endpoints, 10 µs at 100).

::

    .venv/bin/python -m pytest benchmarks/micro/test_balancing_micro.py --benchmark-only -q
"""

from __future__ import annotations

import random
import time

import pytest

from rpcframe.balancing.endpoint import Endpoint, EndpointStats, Outcome
from rpcframe.balancing.pickers import PickerContext, build_picker


def _picker(policy: str, n: int):  # type: ignore[no-untyped-def]
    stats = [EndpointStats(Endpoint(f"10.0.0.{i}:1"), time.monotonic) for i in range(n)]
    for s in stats:  # warm EWMA so P2C compares real numbers
        s.begin()
        s.done(Outcome.SUCCESS, 0.001 + random.random() / 1000)
    return build_picker(policy, stats, PickerContext(clock=time.monotonic))


@pytest.mark.parametrize(
    "policy", ["filtered_p2c", "peak_ewma", "least_request", "round_robin", "weighted_round_robin"]
)
@pytest.mark.parametrize("endpoints", [3, 10, 100])
def test_pick_and_done(benchmark, policy: str, endpoints: int) -> None:  # type: ignore[no-untyped-def]
    picker = _picker(policy, endpoints)

    def one_call() -> None:
        _, done = picker.pick()
        done(Outcome.SUCCESS, 0.001)

    benchmark(one_call)
