"""One call flow for both client fronts: pick, send, wait, retry, fail over, hedge, restart, give up.

A flow is a generator that does no I/O (the shape of httpx's ``auth_flow``
and h11's state machines). It yields *actions* and receives their results;
each front has a small driver that performs them the way it waits (threads
or asyncio)::

    (PICK, plan, avoid)      -> Pick                 an endpoint, other than ``avoid`` if possible
    (CALL, stats, plan)      -> (ok, value)          send one attempt and wait for its end
    (START, stats, plan)     -> handle               send one attempt, do not wait (hedging)
    (WAIT, handles, timeout) -> [(handle, ok, value)] the attempts that ended (none: timed out)
    (CANCEL, handles)        -> None
    (SLEEP, seconds)         -> None
    (OPEN, stats, done, plan) -> handle              open a stream (``done`` is called when it ends)
    (DELIVER, handle)        -> (delivered, error)   hand its responses to the caller: whether any
                                                     arrived, and the RpcError that ended it or None

``value`` is the response, or the ``grpc.RpcError`` that ended the
attempt. A driver that fails to perform an action throws the exception
into the flow, which releases what it holds and re-raises.

The decisions (what may be retried, when, where) are in
:class:`Attempts` and :mod:`rpcframe._core.retry`; the events go to the
channel's observer (:mod:`rpcframe.observe`) when one is set.

A unary call with no observer and no hedging (``MethodBase._direct``, most
calls) costs no generator round trips when its first attempt answers: the
front performs that PICK and CALL itself, reports the answer, and starts
:func:`unary_flow` at that CALL (``sent``) only for anything else.
"""

from __future__ import annotations

import random
import time
from collections.abc import Generator
from typing import Any

import grpc

from .._core.deadline import CallScope
from .._core.retry import decide
from ..balancing.endpoint import SUCCESS, Outcome
from ..errors import Cancelled, DeadlineExceeded
from ..observe import AttemptInfo, CallInfo
from ._common import CallPlan, MethodBase, outcome_of_error, refused_draining, trailer_facts

__all__ = [
    "CALL", "CANCEL", "DELIVER", "OPEN", "PICK", "SLEEP", "START", "WAIT",
    "Attempts", "Flow", "details_of", "hedged_flow", "status_of", "stream_flow", "trailers_of", "unary_flow",
]  # fmt: skip

PICK, CALL, START, WAIT, CANCEL, SLEEP, OPEN, DELIVER = range(8)


Flow = Generator[tuple[Any, ...], Any, Any]

class Attempts:
    """The attempts of one call after its first failure; decides the next.

    ``sent`` counts attempts that reached the server, ``moved`` those that
    provably never ran (see :mod:`rpcframe._core.retry`). Created only
    when a call fails, so the fast path allocates nothing for it.
    """

    __slots__ = ("_method", "_scope", "deadline", "moved", "sent", "why")

    def __init__(self, method: MethodBase, deadline: float | None, scope: CallScope | None) -> None:
        self._method, self._scope, self.deadline = method, scope, deadline
        self.sent, self.moved = 1, 0
        self.why = "retry"

    @property
    def number(self) -> int:
        """The number of the attempt :meth:`delay` allowed (2 for the first retry)."""
        return self.sent + self.moved

    def delay(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt after ``exc``, or ``None`` to give up."""
        method = self._method
        now = time.monotonic()
        remaining = None if self.deadline is None else self.deadline - now
        if remaining is not None and remaining <= 0:
            return None
        stats = method._channel.stats
        not_run, pushback = trailer_facts(exc)
        if not_run and (pushback is None or len(method._channel._core.current().endpoints) > 1):
            # Never ran: another endpoint takes it at once, whatever the method
            # (a server shedding load, with a pushback, is not sent it again).
            if self.moved < method._failovers:
                self.moved += 1
                stats.failovers += 1
                self.why = "failover"
                return 0.0
            if pushback is None:
                return None
        if not_run:  # shed by the only endpoint, or by every one tried: wait as asked, then retry
            return self._after_pushback(pushback, remaining, now)
        verdict = decide(
            method._retry, attempt=self.sent, code=exc.code().name, idempotent=method.idempotent,
            chain_stop=self._scope is not None and self._scope.is_retry, pushback=pushback,
            remaining=remaining, rand=random.random(),
        )  # fmt: skip
        if not verdict.retry:
            return None
        if not method._budget.try_withdraw(now):
            stats.budget_refused += 1
            return None
        stats.retries += 1
        self.sent += 1
        self.why = "retry"
        return verdict.delay

    def _after_pushback(self, pushback: float | None, remaining: float | None, now: float) -> float | None:
        """The only endpoint refused the call unrun and asked for ``pushback`` seconds: wait and retry.

        Safe for any method (it never ran), but still an extra attempt: it
        counts against the retry policy's attempts and the retry budget,
        and is skipped when the deadline would pass first.
        """
        method = self._method
        if pushback is None or pushback < 0 or self.sent >= method._retry.max_attempts:
            return None
        if remaining is not None and remaining <= pushback:
            return None
        if not method._budget.try_withdraw(now):
            method._channel.stats.budget_refused += 1
            return None
        method._channel.stats.retries += 1
        self.sent += 1
        self.why = "retry"
        return pushback


# -- observing ----------------------------------------------------------------


def _call_info(method: MethodBase, plan: CallPlan) -> tuple[CallInfo, CallPlan]:
    """Tell the observer a call starts; the plan carries the headers it added (trace context)."""
    info = CallInfo(method.method, method.kind, method._channel.target, plan.deadline, plan.metadata,
                    time.perf_counter(), plan.request)  # fmt: skip
    method._observer.call_started(info)  # type: ignore[union-attr]  # only called with an observer
    if info.added:
        metadata = (*(plan.base_metadata or ()), *info.added)
        plan = plan._replace(metadata=metadata, base_metadata=metadata)
    return info, plan


def _attempt_info(method: MethodBase, info: CallInfo | None, stats: Any, number: int,
                  why: Attempts | str | None) -> AttemptInfo | None:  # fmt: skip
    if info is None:
        return None
    reason = "first" if number == 1 else why if isinstance(why, str) else why.why if why is not None else "retry"
    attempt = AttemptInfo(stats.address, number, reason, time.perf_counter())
    method._observer.attempt_started(info, attempt)  # type: ignore[union-attr]
    return attempt


def details_of(error: BaseException | None) -> str:
    """The status details a call ended with ("" when it succeeded)."""
    details = getattr(error, "details", None)
    return (details() if callable(details) else "") or ""


def trailers_of(error: BaseException | None) -> tuple[Any, ...]:
    """The trailing metadata of a call that failed with ``error`` (() when it has none)."""
    trailing = getattr(error, "trailing_metadata", None)
    return tuple((trailing() if callable(trailing) else None) or ())


def _sent(plan: CallPlan, attempt: AttemptInfo) -> CallPlan:
    """The plan an attempt is sent with: plus the headers observers added for it."""
    if not attempt.added:
        return plan
    return plan._replace(metadata=(*(plan.metadata or ()), *attempt.added))


def status_of(error: BaseException | None) -> grpc.StatusCode:
    """The status an attempt or call ended with (OK when ``error`` is None)."""
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, GeneratorExit) or type(error).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED  # the caller dropped or cancelled it
    code = getattr(error, "code", None)
    return code() if callable(code) else grpc.StatusCode.UNKNOWN


def _attempt_ended(method: MethodBase, info: CallInfo | None, attempt: AttemptInfo | None,
                   error: BaseException | None, latency: float) -> None:  # fmt: skip
    if info is not None and attempt is not None:
        method._observer.attempt_ended(info, attempt, status_of(error), latency)  # type: ignore[union-attr]


def _call_ended(method: MethodBase, info: CallInfo | None, error: BaseException | None, attempts: int) -> None:
    if info is not None:
        method._observer.call_ended(  # type: ignore[union-attr]
            info, status_of(error), attempts, time.perf_counter() - info.start
        )


# -- the flows ------------------------------------------------------------------


def _again(method: MethodBase, plan: CallPlan, tries: Attempts | None,
           failed: grpc.RpcError) -> Generator[tuple[Any, ...], Any, tuple[CallPlan, Attempts]]:  # fmt: skip
    """After a failed attempt: wait as :class:`Attempts` decides and plan the next one, or raise the error."""
    tries = tries or Attempts(method, plan.deadline, plan.scope)
    delay = tries.delay(failed)
    if delay is None:
        raise method._channel._error(failed)
    if delay:
        yield (SLEEP, delay)
    return plan.next(tries.number), tries


def _report_failure(channel: Any, stats: Any, done: Any, error: grpc.RpcError, latency: float) -> None:
    """Report a failed attempt to its endpoint: a draining server's refusal takes the endpoint out of the
    picker at once, an outlier ejection that came due rebuilds the picker."""
    if refused_draining(error):
        channel.balancer.set_draining(stats)
    if done(outcome_of_error(error), latency):
        channel.balancer.refresh()


def unary_flow(method: MethodBase, plan: CallPlan, sent: tuple[Any, Any, float] | None = None) -> Flow:
    """A unary-response call: one attempt at a time, retried or failed over as :class:`Attempts` decides.

    ``sent`` is ``(stats, done, start)`` of a first attempt a front's fast
    path (:attr:`MethodBase._direct`: no observer, no hedging) already
    picked and sent, and that did not simply answer: the flow begins at that
    attempt's CALL, which the driver primes it to with ``send(None)`` and
    does not perform again.
    """
    channel = method._channel
    info = None
    if method._observer is not None:
        info, plan = _call_info(method, plan)
    tries: Attempts | None = None
    avoid = None
    number = 1
    error: BaseException | None = None
    try:
        while True:
            if sent is None:
                stats, done = yield (PICK, plan, avoid)
                # Observer calls are guarded inline: unobserved calls pay no call for them.
                attempt = None if info is None else _attempt_info(method, info, stats, number, tries)
                start = time.perf_counter()
                action = (CALL, stats, plan if attempt is None else _sent(plan, attempt))
            else:  # the fast path's first attempt (never observed)
                (stats, done, start), sent, attempt = sent, None, None
                action = (CALL, stats, plan)
            try:
                ok, value = yield action
            except BaseException as exc:  # cancelled, or the driver failed
                done(Outcome.IGNORED, time.perf_counter() - start)
                if info is not None:
                    _attempt_ended(method, info, attempt, exc, time.perf_counter() - start)
                raise
            latency = time.perf_counter() - start
            if ok:
                done(SUCCESS, latency)
                if attempt is not None:
                    attempt.response = value
                    _attempt_ended(method, info, attempt, None, latency)
                if method._hedge_state is not None:
                    method._hedge_state.latencies.add(latency)
                return value
            _report_failure(channel, stats, done, value, latency)
            if info is not None:
                _attempt_ended(method, info, attempt, value, latency)
            plan, tries = yield from _again(method, plan, tries, value)
            number, avoid = tries.number, stats
    except BaseException as exc:
        error = exc
        raise
    finally:
        if info is not None:
            _call_ended(method, info, error, number)


class _Copy:
    """One running copy of a hedged call."""

    __slots__ = ("attempt", "done", "handle", "index", "start", "stats")

    def __init__(self, handle: Any, stats: Any, done: Any, index: int, attempt: AttemptInfo | None) -> None:
        self.handle, self.stats, self.done, self.index, self.attempt = handle, stats, done, index, attempt
        self.start = time.perf_counter()


def hedged_flow(method: MethodBase, plan: CallPlan, delay: float) -> Flow:
    """A hedged unary call: a backup after ``delay`` on another endpoint, first answer wins, losers cancelled."""
    state = method._hedge_state
    assert state is not None
    channel = method._channel
    info = None
    if method._observer is not None:
        info, plan = _call_info(method, plan)
    max_attempts = state.policy.max_attempts
    running: list[_Copy] = []
    sent = 0
    wait: float | None = delay
    error: BaseException | None = None
    tried: Any = None  # the endpoint of the last copy sent

    def send() -> Flow:
        nonlocal sent, plan, tried
        sent += 1
        # A copy sent beside running ones is a hedge; one sent after they all failed, a retry.
        # Either goes to another endpoint than the last copy's when there is one.
        reason = "hedge" if running else "retry"
        stats, done = yield (PICK, plan, running[-1].stats if running else tried)
        tried = stats
        if sent > 1:
            try:
                plan = plan.next(sent)
            except DeadlineExceeded:
                done(Outcome.IGNORED, 0.0)
                raise
        attempt = _attempt_info(method, info, stats, sent, reason)
        handle = yield (START, stats, plan if attempt is None else _sent(plan, attempt))
        running.append(_Copy(handle, stats, done, sent, attempt))

    try:
        yield from send()
        while running:
            finished = yield (WAIT, [c.handle for c in running], wait if sent < max_attempts else None)
            if not finished:  # the hedging delay passed first
                if method._may_hedge():
                    yield from send()
                else:
                    wait = None  # budget spent: wait for what is running
                continue
            for handle, ok, value in finished:
                copy = next(c for c in running if c.handle is handle)
                running.remove(copy)
                latency = time.perf_counter() - copy.start
                if ok:
                    copy.done(SUCCESS, latency)
                    if copy.attempt is not None:
                        copy.attempt.response = value
                    _attempt_ended(method, info, copy.attempt, None, latency)
                    state.latencies.add(latency)
                    if copy.index > 1:
                        channel.stats.hedge_wins += 1
                    error = None  # an earlier copy's failure is not the call's
                    return value
                if isinstance(value, grpc.RpcError) and value.code() is not grpc.StatusCode.CANCELLED:
                    _report_failure(channel, copy.stats, copy.done, value, latency)
                else:
                    copy.done(Outcome.IGNORED, latency)
                _attempt_ended(method, info, copy.attempt, value, latency)
                error = value
            if method._ends_hedge(error):
                break
            if not running and sent < max_attempts:
                yield from send()  # every copy failed retryably: the next goes now
        assert error is not None
        raise channel._error(error) if isinstance(error, grpc.RpcError) else error
    except GeneratorExit:  # the call was dropped unawaited: no driver to cancel for us
        running.clear()
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        if running:
            yield (CANCEL, [c.handle for c in running])
            for copy in running:
                latency = time.perf_counter() - copy.start
                copy.done(Outcome.IGNORED, latency)
                _attempt_ended(method, info, copy.attempt, Cancelled("hedge lost"), latency)
        _call_ended(method, info, error, sent)


def stream_flow(method: MethodBase, plan: CallPlan, retry: bool) -> Flow:
    """A streaming-response call; a server stream that fails before its first response is restarted (``retry``)."""
    channel = method._channel
    info = None
    if method._observer is not None:
        info, plan = _call_info(method, plan)
    tries: Attempts | None = None
    avoid = None
    number = 1
    error: BaseException | None = None
    try:
        while True:
            stats, done = yield (PICK, plan, avoid)
            attempt = _attempt_info(method, info, stats, number, tries)
            start = time.perf_counter()
            handle = yield (OPEN, stats, done, plan if attempt is None else _sent(plan, attempt))
            delivered, failed = yield (DELIVER, handle)
            _attempt_ended(method, info, attempt, failed, time.perf_counter() - start)
            if failed is None:
                return None
            if isinstance(failed, grpc.RpcError) and refused_draining(failed):
                channel.balancer.set_draining(stats)
            if delivered or not retry:  # responses were seen, or requests were streamed: not replayable
                raise channel._error(failed)
            plan, tries = yield from _again(method, plan, tries, failed)
            number, avoid = tries.number, stats
    except BaseException as exc:
        error = exc
        raise
    finally:
        _call_ended(method, info, error, number)
