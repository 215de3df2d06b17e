"""The drain's decision of when a stopping server may send GOAWAY (pure; time is an argument)."""

from __future__ import annotations

from rpcframe.server._common import Drain


def test_waits_for_accepted_calls_then_for_callers_to_go_quiet() -> None:
    drain = Drain(now=100.0, grace=10.0)
    assert not drain.over(100.0 + Drain.QUIET, busy=True)
    drain.refused(100.1)  # a caller still sends: wait until it has been quiet
    assert not drain.over(100.1 + Drain.QUIET / 2, busy=False)
    assert drain.over(100.1 + Drain.QUIET * 1.5, busy=False)
    assert drain.grace_left(100.2) == Drain.CLOSE  # only refusals can be running now


def test_a_caller_that_never_stops_holds_the_drain_at_most_quiet_max() -> None:
    drain = Drain(now=0.0, grace=10.0)
    for tick in range(1, 100):
        now = tick * Drain.QUIET / 2
        if now >= Drain.QUIET_MAX:
            break
        drain.refused(now)
        assert not drain.over(now, busy=False)
    assert drain.over(Drain.QUIET_MAX, busy=False)


def test_busy_calls_get_the_whole_grace_and_grpc_gets_what_is_left() -> None:
    drain = Drain(now=0.0, grace=3.0)
    assert not drain.over(2.9, busy=True)
    assert drain.over(3.0, busy=True)
    assert drain.grace_left(3.5) == 0.0
    early = Drain(now=0.0, grace=3.0)
    assert not early.over(1.0, busy=True)
    assert early.grace_left(1.0) == 2.0  # not over yet: the rest of the grace
