"""Pure deadline, retry, budget and hedging policy, with a fake clock."""

from __future__ import annotations

import pytest

import rpcframe
from rpcframe._core.budget import BudgetConfig, RateBudget
from rpcframe._core.deadline import CallScope, DeadlinePassed, bounded_timeout, deadline_scope, scope_var
from rpcframe._core.hedge import HedgePolicy, LatencyWindow
from rpcframe._core.retry import RetryPolicy, decide, parse_pushback


class Cancellable:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> bool:
        self.cancelled += 1
        return True


# -- deadlines ---------------------------------------------------------------------


def test_bounded_timeout_takes_the_earlier_of_own_and_inherited() -> None:
    assert bounded_timeout(None, None, 100.0, 0.01) is None
    assert bounded_timeout(5.0, None, 100.0, 0.01) == 5.0
    assert bounded_timeout(None, 102.0, 100.0, 0.5) == pytest.approx(1.5)
    assert bounded_timeout(1.0, 110.0, 100.0, 0.5) == 1.0
    assert bounded_timeout(30.0, 110.0, 100.0, 0.5) == pytest.approx(9.5)


def test_expired_deadline_is_refused_before_sending() -> None:
    with pytest.raises(DeadlinePassed, match="had passed before the call was sent"):
        bounded_timeout(1.0, 99.75, 100.0, 0.01)
    with pytest.raises(DeadlinePassed, match="margin"):
        bounded_timeout(None, 100.004, 100.0, 0.005)
    with pytest.raises(DeadlinePassed):
        bounded_timeout(0.0, None, 100.0, 0.0)


def test_scope_cancels_tracked_calls_once_and_new_ones_at_once() -> None:
    scope = CallScope(None)
    a, b, late = Cancellable(), Cancellable(), Cancellable()
    scope.track(a)
    scope.track(b)
    scope.untrack(b)
    scope.cancel_all()
    assert (a.cancelled, b.cancelled) == (1, 0)
    scope.track(late)
    assert late.cancelled == 1


def test_scope_that_ended_normally_cancels_nothing() -> None:
    scope = CallScope(None)
    call = Cancellable()
    scope.track(call)
    scope.ended = True
    scope.cancel_all()
    assert call.cancelled == 0


def test_nested_deadline_block_shortens_and_shares_tracking() -> None:
    outer = CallScope(105.0, is_retry=True)
    token = scope_var.set(outer)
    try:
        with deadline_scope(100.0, now=100.0) as longer:
            assert longer.deadline == 105.0
            assert longer.is_retry
        with deadline_scope(1.0, now=100.0) as shorter:
            assert shorter.deadline == 101.0
            call = Cancellable()
            shorter.track(call)
        outer.cancel_all()
        assert call.cancelled == 1
    finally:
        scope_var.reset(token)
    assert scope_var.get() is None


def test_deadline_after_and_time_remaining() -> None:
    assert rpcframe.time_remaining() is None
    with rpcframe.deadline_after(2.0):
        left = rpcframe.time_remaining()
        assert left is not None
        assert 1.5 < left <= 2.0
    assert rpcframe.time_remaining() is None
    with pytest.raises(rpcframe.ConfigError), rpcframe.deadline_after(0):
        pass


# -- retry policy ------------------------------------------------------------------


def _decide(**overrides: object) -> tuple[bool, float, str]:
    args: dict[str, object] = {
        "attempt": 1, "code": "UNAVAILABLE", "idempotent": True, "chain_stop": False,
        "pushback": None, "remaining": None, "rand": 0.5,
    }  # fmt: skip
    args.update(overrides)
    return tuple(decide(RetryPolicy(), **args))  # type: ignore[arg-type,return-value]


def test_retry_decision_table() -> None:
    assert _decide() == (True, 0.025, "retrying")
    assert _decide(code="NOT_FOUND")[0] is False
    assert _decide(idempotent=False)[2] == "the method is not marked NO_SIDE_EFFECTS or IDEMPOTENT"
    assert _decide(attempt=3)[2] == "3 attempts made"
    assert _decide(chain_stop=True)[2] == "the incoming call was itself a retry"
    assert _decide(pushback=-1.0)[2] == "the server pushed back"
    assert _decide(pushback=0.3)[:2] == (True, 0.3)
    assert _decide(pushback=0.3, remaining=0.2)[2] == "no time left before the deadline"


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, backoff_multiplier=2.0)
    assert [policy.backoff(n, 0.999999) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.4, 0.5], abs=1e-5)
    assert policy.backoff(3, 0.0) == 0.0
    assert policy.backoff(2, 0.5) == pytest.approx(0.1)


def test_retry_policy_validates() -> None:
    assert RetryPolicy(retryable_codes=frozenset({"unavailable"})).retryable_codes == {"UNAVAILABLE"}
    for bad in ({"max_attempts": 0}, {"initial_backoff": 2.0, "max_backoff": 1.0}, {"backoff_multiplier": 0.5},
                {"retryable_codes": frozenset({"NOPE"})}):  # fmt: skip
        with pytest.raises(rpcframe.ConfigError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def test_pushback_parsing() -> None:
    assert parse_pushback(None) is None
    assert parse_pushback("250") == 0.25
    assert parse_pushback(b"0") == 0.0
    assert parse_pushback("-1") == -1.0
    assert parse_pushback("soon") == -1.0


# -- budget ------------------------------------------------------------------------


def test_budget_allows_ratio_of_requests_plus_floor() -> None:
    budget = RateBudget(BudgetConfig(ratio=0.2, min_per_second=1.0, ttl=10))
    now = 1000.0
    for _ in range(100):
        budget.deposit(now)
    granted = sum(budget.try_withdraw(now) for _ in range(100))
    assert granted == 20 + 10  # 20 % of 100 requests plus 1/s over 10 s
    assert budget.usage(now) == (100, 30)


def test_budget_forgets_after_ttl() -> None:
    budget = RateBudget(BudgetConfig(ratio=0.0, min_per_second=0.1, ttl=10))
    assert budget.try_withdraw(50.0)
    assert not budget.try_withdraw(50.5)
    assert not budget.try_withdraw(59.0)
    assert budget.try_withdraw(61.0)


def test_budget_with_no_floor_needs_requests() -> None:
    budget = RateBudget(BudgetConfig(ratio=0.05, min_per_second=0.0))
    for i in range(19):
        budget.deposit(10.0 + i * 0.01)
    assert not budget.try_withdraw(10.5)
    budget.deposit(10.5)
    assert budget.try_withdraw(10.5)
    assert not budget.try_withdraw(10.5)


def test_budget_config_validates() -> None:
    for bad in ({"ratio": -0.1}, {"min_per_second": -1.0}, {"ttl": 0.5}):
        with pytest.raises(rpcframe.ConfigError):
            BudgetConfig(**bad)  # type: ignore[arg-type]


# -- hedging -----------------------------------------------------------------------


def test_latency_window_percentile_and_adaptive_delay() -> None:
    policy = HedgePolicy(min_samples=100, percentile=0.95, min_delay=0.002)
    window = LatencyWindow(policy.percentile, size=1000, refresh=50)
    assert window.delay(policy) is None
    for i in range(100):
        window.add((i + 1) / 1000)  # 1 .. 100 ms
    assert window.delay(policy) == pytest.approx(0.096)
    assert window.delay(HedgePolicy(delay=0.2)) == 0.2
    fast = LatencyWindow(0.95, refresh=10)
    for _ in range(60):
        fast.add(0.0001)
    assert fast.delay(HedgePolicy(min_samples=50, min_delay=0.002)) == 0.002


def test_latency_window_keeps_only_recent_samples() -> None:
    window = LatencyWindow(0.5, size=10, refresh=10)
    for _ in range(10):
        window.add(1.0)
    for _ in range(10):
        window.add(0.01)
    assert window.value == 0.01
    assert window.samples == 20


def test_hedge_policy_validates() -> None:
    for bad in ({"max_attempts": 1}, {"delay": -1.0}, {"percentile": 1.0}, {"max_extra_load": 0.0}):
        with pytest.raises(rpcframe.ConfigError):
            HedgePolicy(**bad)  # type: ignore[arg-type]


# -- per-method config -------------------------------------------------------------


def test_method_config_most_specific_wins() -> None:
    no_retry = RetryPolicy(max_attempts=1)
    hedge = HedgePolicy(delay=0.01)
    config = rpcframe.ChannelConfig(
        default_timeout=5.0,
        methods={
            "pkg.Svc": rpcframe.MethodConfig(timeout=1.0, retry=no_retry),
            "pkg.Svc/Get": rpcframe.MethodConfig(hedge=hedge),
        },
    )
    get = config.method_config("/pkg.Svc/Get")
    assert (get.timeout, get.retry, get.hedge) == (1.0, no_retry, hedge)
    put = config.method_config("/pkg.Svc/Put")
    assert (put.timeout, put.retry, put.hedge) == (1.0, no_retry, None)
    other = config.method_config("/pkg.Other/Get")
    assert (other.timeout, other.retry, other.hedge) == (5.0, RetryPolicy(), None)
    with pytest.raises(rpcframe.ConfigError, match="methods"):
        rpcframe.ChannelConfig(methods={"/pkg.Svc/Get": rpcframe.MethodConfig()})
