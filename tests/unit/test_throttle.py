"""Client-side adaptive throttling on a fake clock (the SRE book's formula)."""

from __future__ import annotations

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
