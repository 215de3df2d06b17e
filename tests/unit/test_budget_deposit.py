"""RateBudget.deposit's shortcut for deposits within the second of the previous one: same counts as before."""

from __future__ import annotations

from rpcframe._core.budget import BudgetConfig, RateBudget


def test_deposits_count_per_second_across_the_window() -> None:
    budget = RateBudget(BudgetConfig(ttl=3))
    for now in (10.1, 10.5, 10.9):  # one second, one bucket
        budget.deposit(now)
    assert budget.usage(10.9) == (3, 0)
    for now in (11.0, 11.2):  # the next second starts at exactly 11.0
        budget.deposit(now)
    assert budget.usage(11.2) == (5, 0)
    budget.deposit(13.5)  # second 10 leaves the 3 s window
    assert budget.usage(13.5) == (3, 0)
    budget.deposit(14.0)  # second 14 reuses second 11's bucket: it restarts at 1
    assert budget.usage(14.0) == (2, 0)


def test_a_deposit_from_an_earlier_second_goes_to_that_second() -> None:
    budget = RateBudget(BudgetConfig(ttl=3))
    budget.deposit(20.5)
    budget.deposit(19.99)  # another thread's clock read a moment earlier
    budget.deposit(20.6)
    assert budget.usage(20.6) == (3, 0)
    assert budget.usage(22.5) == (2, 0)  # second 19 out of the window, second 20 in


def test_a_withdrawal_that_starts_a_new_second_keeps_deposits_right() -> None:
    budget = RateBudget(BudgetConfig(ratio=1.0, min_per_second=1.0, ttl=2))
    budget.deposit(30.2)
    budget.deposit(30.4)
    assert budget.try_withdraw(32.1)  # second 32 reuses second 30's bucket (2 requests still counted then)
    budget.deposit(32.3)
    budget.deposit(32.5)
    assert budget.usage(32.5) == (2, 1)  # the restarted bucket: its two deposits and the withdrawal
