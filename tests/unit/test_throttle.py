"""Client-side adaptive throttling on a fake clock (the SRE book's formula)."""

from __future__ import annotations

import random

import pytest

from rpcframe._core.throttle import AdaptiveThrottle, ThrottleConfig
from rpcframe.errors import ConfigError


def test_no_local_refusal_while_the_endpoint_accepts_more_than_one_in_k() -> None:
    throttle = AdaptiveThrottle(ThrottleConfig(k=2), now=0.0)
    for i in range(100):
        throttle.record(i % 2 == 0, now=i * 0.01)  # half accepted: exactly 1/k
    assert throttle.p == 0.0


def test_the_refusal_share_follows_the_formula() -> None:
    throttle = AdaptiveThrottle(ThrottleConfig(k=2), now=0.0)
    for i in range(100):
        throttle.record(i % 10 == 0, now=i * 0.01)  # 10 % accepted
    assert throttle.p == pytest.approx((100 - 2 * 10) / 101)


def test_old_history_leaves_the_window() -> None:
    throttle = AdaptiveThrottle(ThrottleConfig(k=2, window=10), now=0.0)
    for i in range(100):
        throttle.record(False, now=i * 0.01)
    assert throttle.p > 0.9
    throttle.record(True, now=11.5)  # the refusals were more than a window ago
    assert (throttle.requested, throttle.accepted) == (1, 1)
    assert throttle.p == 0.0


def test_a_few_refusals_refuse_nothing_locally() -> None:
    throttle = AdaptiveThrottle(ThrottleConfig(min_requests=10), now=0.0)
    for i in range(9):
        throttle.record(False, now=i * 0.01)
    assert throttle.p == 0.0
    throttle.record(False, now=0.1)
    assert throttle.p == pytest.approx(10 / 11)


@pytest.mark.parametrize("kwargs", [{"k": 0.5}, {"window": 0}, {"min_requests": -1}])
def test_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ThrottleConfig(**kwargs)


def test_p_always_matches_the_formula_over_the_window() -> None:
    # The record() fast path skips recomputing p after an accept; it must never change the answer.
    rng = random.Random(7)
    config = ThrottleConfig(window=10.0, min_requests=5)
    throttle = AdaptiveThrottle(config, 0.0)
    history: list[tuple[float, bool]] = []
    now = 0.0
    for _ in range(5000):
        now += rng.expovariate(50.0)
        accepted = rng.random() < (0.2 if int(now) % 20 < 7 else 0.95)  # stretches of mostly refused calls
        throttle.record(accepted, now)
        history.append((now, accepted))
        oldest_slot = int(now / 1.0) - AdaptiveThrottle.BUCKETS + 1  # the ten 1 s buckets still counted
        window = [ok for at, ok in history[-2000:] if int(at / 1.0) >= oldest_slot]  # ~500 calls per window
        requests, accepts = len(window), sum(window)
        expected = 0.0 if requests < 5 else max(0.0, (requests - 2.0 * accepts) / (requests + 1))
        assert throttle.p == pytest.approx(expected), (now, requests, accepts)


def test_an_accept_that_completes_min_requests_applies_the_formula() -> None:
    throttle = AdaptiveThrottle(ThrottleConfig(k=2, min_requests=5), now=0.0)
    for i in range(4):
        throttle.record(False, now=i * 0.01)
    assert throttle.p == 0.0  # too few requests to judge
    throttle.record(True, now=0.05)
    assert throttle.p == pytest.approx((5 - 2 * 1) / 6)
