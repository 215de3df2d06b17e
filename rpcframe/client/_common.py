"""What both client fronts share: per-call preparation, outcome policy, balancing.

Every call, of every kind, on both fronts, goes through one
:class:`MethodBase` subclass instance made once per stub method. Per call it
applies the channel's policy (:meth:`MethodBase._prepare`: default timeout and
metadata), picks an endpoint from the balancer's current picker, sends the
call on that endpoint's grpc channel, reports the outcome to the pick's
done-callback, and retries, fails over or hedges on another endpoint when the
contract and the budget allow (:class:`Attempts`, policy in
:mod:`rpcframe._core.retry`). The fronts only differ in how they wait.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2

from .._core.budget import BudgetConfig, RateBudget
from .._core.deadline import CallScope, DeadlinePassed, bounded_timeout, scope_var
from .._core.hedge import HedgePolicy, LatencyWindow
from .._core.overload import CRITICALITY_KEY, criticality_var
from .._core.retry import NOT_RUN_KEY, PUSHBACK_KEY, parse_pushback
from ..balancing.balancer import BalancerCore, Connectivity, EndpointEntry
from ..balancing.endpoint import Endpoint, EndpointStats, Outcome, backend_address
from ..balancing.pickers import NoEndpointError, Pick, PickerContext
from ..balancing.resolver import Resolver, resolver_for
from ..config import ChannelConfig, compression_of, is_small
from ..errors import DeadlineExceeded, ResourceExhausted, RpcError, Unavailable, from_grpc
from ..observe import EndpointState, combine
from ..security.tls import channel_credentials
from ..security.tokens import check_token_transport, token_parts

Metadata = Sequence[tuple[str, str | bytes]]
S = TypeVar("S")
Target = str | Sequence[str] | Resolver

_IDEMPOTENT_LEVELS = (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT)

#: Status codes that blame the endpoint (fed to outlier detection).
_ENDPOINT_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

_AVOID_TRIES = 4  # re-picks to find another endpoint than the one that failed
_READY_TRIES = 8  # re-picks after grpc says a picked endpoint lost its connection
_RENEW_BACKOFF = (0.05, 5.0)  # seconds: first and longest wait before replacing a NOT_SERVING connection



#: Sent with every attempt after the first (retries and hedges), so servers
#: see it was a retry and the calls they make are not retried again.
ATTEMPT_KEY = "rpcframe-attempt"


class CallPlan(NamedTuple):
    """What one attempt of a call is sent with; :meth:`next` derives the next attempt's.

    The deadline is absolute (``time.monotonic()``), fixed when the stub
    method is called; ``timeout`` is what the first attempt sends.
    """

    deadline: float | None
    timeout: float | None
    metadata: Metadata | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None
    scope: CallScope | None
    base_metadata: Metadata | None
    request: Any = None  #: the request message (an iterator for request streams)
    attempt: int = 1

    def next(self, attempt: int) -> CallPlan:
        """The plan of attempt number ``attempt``: what is left of the deadline, marked as a retry."""
        return self._replace(
            attempt=attempt, timeout=remaining_timeout(self.deadline),
            metadata=with_attempt(self.base_metadata, attempt),
        )  # fmt: skip


_new_plan = tuple.__new__


def remaining_timeout(deadline: float | None) -> float | None:
    """Time left for another attempt; DeadlineExceeded when none is."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the deadline passed before the call could be retried")
    return remaining


def with_attempt(metadata: Metadata | None, attempt: int) -> Metadata:
    """``metadata`` plus the marker of the ``attempt``-th attempt (2 or more)."""
    marker = ((ATTEMPT_KEY, str(attempt)),)
    return tuple(metadata) + marker if metadata else marker


def outcome_of(code: grpc.StatusCode) -> Outcome:
    """How a call's status counts for balancing and outlier detection."""
    if code is grpc.StatusCode.CANCELLED:
        return Outcome.IGNORED
    return Outcome.FAILURE if code in _ENDPOINT_FAILURES else Outcome.SUCCESS


def outcome_of_error(error: grpc.RpcError) -> Outcome:
    """How a failed attempt counts: REJECTED when the server refused it unrun as overloaded.

    A shedding server answers at once; counted as a success (or by its
    latency) it would look like the fastest endpoint and draw more calls. A
    draining server's refusal (:func:`refused_draining`) is IGNORED: an
    orderly shutdown says nothing of the endpoint's health.
    """
    code = error.code()
    if code in _REFUSAL_CODES and trailer_facts(error)[0]:  # refused unrun: shedding load, or draining
        return Outcome.IGNORED if code is grpc.StatusCode.UNAVAILABLE else Outcome.REJECTED
    return outcome_of(code)


def refused_draining(error: grpc.RpcError) -> bool:
    """Whether a failed attempt was refused unrun by a server that is shutting down.

    rpcframe's server ends calls unrun with UNAVAILABLE only while it drains
    (:data:`rpcframe.server._common.NOT_RUN`); its other refusals are
    RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED.
    """
    return error.code() is grpc.StatusCode.UNAVAILABLE and trailer_facts(error)[0]


_REFUSAL_CODES = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
)


def trailer_facts(exc: grpc.RpcError) -> tuple[bool, float | None]:
    """What a failed call's trailers say: (the server never ran it, its retry pushback).

    Never-ran is rpcframe's server marker (:data:`~rpcframe._core.retry.NOT_RUN_KEY`),
    which its wrapper sets only on calls it ended before their handler began and
    strips from whatever a handler raises. Status details are never read: a
    handler's text ("connection refused" from its own dependency) says nothing
    about whether *this* call ran.
    """
    not_run, pushback = False, None
    for key, value in exc.trailing_metadata() or ():
        if key == NOT_RUN_KEY:
            not_run = True
        elif key == PUSHBACK_KEY:
            pushback = parse_pushback(value)
    return not_run, pushback


def is_idempotent(method: str) -> bool:
    """The contract's ``idempotency_level`` for ``/pkg.Service/Method``."""
    full_name = method.lstrip("/").replace("/", ".")
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(full_name)
    except KeyError:
        return False
    return descriptor.GetOptions().idempotency_level in _IDEMPOTENT_LEVELS


def connectivity_of(state: grpc.ChannelConnectivity) -> Connectivity:
    """grpc's connectivity enum as the balancer's."""
    return Connectivity[state.name]


_CY_READY = grpc.ChannelConnectivity.READY.value[0]  # READY as the cygrpc channel says it

HEALTH_BACKOFF = (0.05, 2.0)  # seconds: first and longest wait between health Watch attempts


class SubchannelBase:
    """One endpoint's grpc channel (made with ``grpc_module``: grpc or grpc.aio) and its multicallables."""

    def __init__(self, address: str, grpc_module: Any, core: BalancerCore, config: ChannelConfig) -> None:
        options, tls = config.channel_options(), config.tls
        dial = address if config.connections_per_endpoint == 1 else backend_address(address)
        if tls is not None:
            creds = channel_credentials(tls)
            channel = grpc_module.secure_channel(dial, creds, options=options + tls.channel_options())
        else:
            channel = grpc_module.insecure_channel(dial, options=options)
        self.address = address
        self.channel = channel
        # The cygrpc channel below either front's: it answers "connected now?" without
        # the Python layer (once per call; grpc's sync channel has no public call for it).
        self._cy_channel = channel._channel
        self._core = core
        self._health_request = health_pb2.HealthCheckRequest(service=config.health_service)
        # Keyed by wrapper object: two wrappers of one method path may carry
        # different serializers (a typed stub and a raw-bytes call).
        #: grpc multicallables by method wrapper (see :meth:`call`; the per-call send reads it first).
        self.calls: dict[MethodBase, Any] = {}
        #: Told each health status (address, serving) when the channel replaces connections that reach a
        #: draining worker (``connections_per_endpoint`` > 1); None otherwise.
        self.renew: Callable[[str, bool], None] | None = None

    def ready(self) -> bool:
        """Whether grpc's channel has a connection now (asked of grpc, not of our watcher)."""
        return bool(self._cy_channel.check_connectivity_state(False) == _CY_READY)

    def connectivity(self) -> Connectivity:
        """grpc's connectivity state of the channel now."""
        raise NotImplementedError

    def _health_seen(self, response: Any) -> None:
        serving = response.status == health_pb2.HealthCheckResponse.SERVING
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        self._core.set_serving(self.address, serving, name, self)
        if self.renew is not None:
            self.renew(self.address, serving)

    def _health_gone(self, exc: grpc.RpcError) -> bool:
        """Whether to stop watching after ``exc``: the server has no health service (trust connectivity)."""
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            self._core.set_serving(self.address, True, "", self)
            return True
        return False

    #: Turns a unary-unary grpc multicallable into the front's lean one (see ``_sync_unary``, ``_aio_unary``).
    lean: Callable[[Any], Any] = staticmethod(lambda multicallable: multicallable)

    def call(self, method: MethodBase) -> Any:
        """The grpc multicallable of ``method`` on this endpoint (cached; unary-unary ones made lean)."""
        mc = self.calls.get(method)
        if mc is None:
            factory = getattr(self.channel, method.kind)
            mc = factory(method.method, method.serializer, method.deserializer, True)
            if method.kind == "unary_unary":
                mc = self.lean(mc)
            self.calls[method] = mc
        return mc


class BalancedChannelBase:
    """Resolver -> balancer core -> one grpc channel per endpoint.

    A front sets ``_kinds``: its wrapper classes for unary-unary,
    unary-stream, stream-unary and stream-stream methods.
    """

    _kinds: tuple[type[MethodBase], ...] = ()

    def __init__(self, target: Target, config: ChannelConfig | None) -> None:
        self.config = config or ChannelConfig()
        self.target = (
            target
            if isinstance(target, str)
            else ",".join(target)
            if isinstance(target, list | tuple)
            else repr(target)
        )
        cfg = self.config
        self._core = BalancerCore(
            self.target,
            cfg.policy,
            PickerContext(clock=time.monotonic, slow_start=cfg.slow_start),
            outlier=cfg.outlier,
            panic_threshold=cfg.panic_threshold,
            ewma_decay=cfg.ewma_decay,
            throttle=cfg.throttle,
        )
        if cfg.token is not None:  # refuse to leak a token over plaintext
            check_token_transport(target, cfg.tls is not None, cfg.allow_insecure_token)
        self._resolver = resolver_for(target, cfg.dns_refresh)
        self.retry_budget = RateBudget(cfg.retry_budget)
        self.stats = CallStats()
        self.observer = combine(cfg.observers)
        self._method_state: dict[str, MethodState] = {}
        self._renewals: dict[str, int] = {}  # connection -> replacements in a row that did not serve
        self._closed = False
        if self.observer is not None:
            self.observer.channel_opened(self)

    def _renewal(self, address: str, serving: bool) -> float | None:
        """Seconds after which ``address``'s connection, now NOT_SERVING, is replaced; None when it serves.

        With several connections per address, one that reaches a draining
        worker of a ``--workers`` server is replaced by a new connection,
        which the kernel gives to any worker listening: the calls find the
        other workers (the new one included) before the draining one starts
        refusing them, even when every connection had landed on it. A
        replacement that lands on a draining worker again is retried after
        a doubling delay, reset once one serves.
        """
        if serving:
            self._renewals.pop(address, None)
            return None
        count = self._renewals.get(address, 0)
        self._renewals[address] = count + 1
        return float(min(_RENEW_BACKOFF[0] * 2**count, _RENEW_BACKOFF[1]))

    def _renew(self, address: str) -> EndpointEntry | None:
        """Replace ``address``'s connection if it still does not serve; the old entry, for the front to retire."""
        if self._closed:
            return None
        entry = next((e for e in self._core.entries() if e.stats.address == address), None)
        if entry is None or entry.serving:
            return None
        # With health checking the replacement waits for its first SERVING: the kernel may hand the new
        # connection to the draining worker again, and a call sent there once grpc's own shutdown has
        # begun is dropped unrun as a bare CANCELLED, which a client cannot resend safely.
        return self._core.renew(address, self._attach, serving=not self.config.health_check)

    def _attach(self, entry: EndpointEntry) -> None:
        raise NotImplementedError

    def _with_connections(self, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """Each endpoint ``connections_per_endpoint`` times: ``address``, ``address#2``, ...

        Each copy is a balancer entry with its own grpc channel, and so its
        own connection (endpoint channels use a local subchannel pool): the
        policy picks among them as among distinct endpoints.
        """
        count = self.config.connections_per_endpoint
        if count == 1:
            return endpoints
        return [e if i == 1 else dataclasses.replace(e, address=f"{e.address}#{i}")
                for e in endpoints for i in range(1, count + 1)]  # fmt: skip

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def counters(self) -> dict[str, int]:
        """Extra attempts so far: retries, failovers, hedges, hedge_wins, budget_refused."""
        return self.stats.as_dict()

    def endpoint_states(self) -> list[EndpointState]:
        """Every endpoint's state, in-flight calls and ejections now (for metrics)."""
        now = time.monotonic()
        return [
            EndpointState(e.stats.address, e.state(now), e.stats.inflight, e.stats.ejections)
            for e in self._core.entries()
        ]

    def method_state(self, method: str, hedge: HedgePolicy) -> MethodState:
        """Latency window and hedge budget of one method (shared by its stubs)."""
        state = self._method_state.get(method)
        if state is None:
            state = self._method_state[method] = MethodState(hedge)
        return state

    @property
    def balancer(self) -> BalancerCore:
        """The balancer core (endpoint states, current picker)."""
        return self._core

    def endpoints(self) -> list[tuple[str, str]]:
        """(address, state) of every endpoint, for status pages and tests."""
        now = time.monotonic()
        return [(e.stats.address, e.describe(now).split(" ", 1)[1]) for e in self._core.entries()]

    def _error(self, exc: grpc.RpcError) -> RpcError:
        """A failed call's error in rpcframe's tree, naming the endpoints when none was usable."""
        err = from_grpc(exc)
        if err.code() is grpc.StatusCode.UNAVAILABLE and self._core.fallback:
            return Unavailable(f"{self._core.reason}: {err.details()}")
        return err

    def stub(self, stub_class: Callable[[Any], S]) -> S:
        """Instantiate a generated ``*Stub`` class on this channel."""
        return stub_class(self)

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: bool = False) -> Any:  # fmt: skip
        """Wrap a unary method (called by generated stubs)."""
        return self._kinds[0](self, method, request_serializer, response_deserializer)

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool = False) -> Any:  # fmt: skip
        """Wrap a server-streaming method (called by generated stubs)."""
        return self._kinds[1](self, method, request_serializer, response_deserializer)

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool = False) -> Any:  # fmt: skip
        """Wrap a client-streaming method (called by generated stubs)."""
        return self._kinds[2](self, method, request_serializer, response_deserializer)

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      _registered_method: bool = False) -> Any:  # fmt: skip
        """Wrap a bidirectional-streaming method (called by generated stubs)."""
        return self._kinds[3](self, method, request_serializer, response_deserializer)

    def _pick_now(self, wait_for_ready: bool | None, avoid: EndpointStats | None = None) -> Pick:
        """Pick without waiting; Unavailable when nothing can take the call now.

        ``avoid`` is the endpoint a failed attempt of this call used: a
        failover goes elsewhere whenever the picker has another endpoint.
        The pick is checked against grpc's own connectivity: the watcher
        learns of a dropped connection a little after grpc does, and a call
        sent in that gap would fail at grpc's pick with a status the client
        cannot tell from a server's. Asking grpc first makes "not sent" a
        fact: the endpoint leaves the picker now and the call goes elsewhere
        (or waits, or fails, as when none is ready).
        """
        core = self._core
        for _ in range(_READY_TRIES):
            # core.current() without a call while no ejection is due to end (nearly always).
            picker = core.picker if core.expires_at == math.inf else core.current()
            if core.all_failed and not wait_for_ready:
                raise Unavailable(core.reason)
            stats, done = picker.pick() if avoid is None else _pick_other(picker, avoid)
            # stats.handle.ready(), inlined: once per call.
            if core.fallback or stats.handle._cy_channel.check_connectivity_state(False) == _CY_READY:
                break
            done(Outcome.IGNORED, 0.0)
            core.set_connectivity(stats.address, stats.handle.connectivity(), stats.handle)
        throttle = stats.throttle
        if throttle is not None and throttle.p > 0.0 and random.random() < throttle.p:
            return self._throttled(picker, stats, done)
        return stats, done

    def _throttled(self, picker: Any, stats: EndpointStats, done: Callable[..., Any]) -> Pick:
        """Client throttling refused ``stats`` locally: another endpoint that does not, or ResourceExhausted."""
        done(Outcome.IGNORED, 0.0)
        if stats.throttle is not None:  # a request the endpoint did not accept (SRE: counted, though not sent)
            stats.throttle.record(False, time.monotonic())
        self.stats.throttled += 1
        other, other_done = _pick_other(picker, stats)
        throttle = other.throttle
        if other is not stats and (throttle is None or random.random() >= throttle.p) and other.handle.ready():
            return other, other_done
        other_done(Outcome.IGNORED, 0.0)
        raise ResourceExhausted(
            f"not sent: {stats.address} refused most recent calls as overloaded (client-side throttling)"
        )


def _pick_other(picker: Any, avoid: EndpointStats | None) -> Pick:
    """A pick from ``picker``, other than ``avoid`` whenever there is another endpoint."""
    stats, done = picker.pick()
    if avoid is None or stats is not avoid or len(picker.endpoints) < 2:
        return stats, done
    for _ in range(_AVOID_TRIES):
        done(Outcome.IGNORED, 0.0)
        stats, done = picker.pick()
        if stats is not avoid:
            return stats, done
    # A policy that keeps choosing it (pick_first): take the next one in order.
    done(Outcome.IGNORED, 0.0)
    endpoints = picker.endpoints
    stats = endpoints[(endpoints.index(avoid) + 1) % len(endpoints)]
    stats.begin()
    return stats, stats.done


class CallStats:
    """Counters of a channel's extra attempts (for benchmarks and status pages)."""

    __slots__ = ("budget_refused", "failovers", "hedge_wins", "hedges", "retries", "throttled")

    def __init__(self) -> None:
        self.retries = 0  # sent attempts after a failure
        self.failovers = 0  # attempts after one that never left the client
        self.hedges = 0  # backup requests sent
        self.hedge_wins = 0  # calls answered by a backup
        self.budget_refused = 0  # retries or hedges the budget refused
        self.throttled = 0  # attempts client-side throttling refused locally

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: getattr(self, name) for name in self.__slots__}


class MethodState:
    """Per channel and method: the hedging policy, recent latencies and the hedging budget."""

    __slots__ = ("budget", "latencies", "policy")

    def __init__(self, hedge: HedgePolicy) -> None:
        self.policy = hedge
        self.latencies = LatencyWindow(hedge.percentile)
        self.budget = RateBudget(BudgetConfig(ratio=hedge.max_extra_load, min_per_second=0.0))


class MethodBase:
    """One stub method's wrapper: its identity and the channel's call policy."""

    __slots__ = (
        "_budget", "_channel", "_compression", "_criticality", "_direct", "_failovers", "_hedge_state", "_margin",
        "_metadata", "_observer", "_retry", "_threshold", "_timeout", "_token", "deserializer", "idempotent", "method",
        "serializer",
    )  # fmt: skip

    kind = ""

    def __init__(
        self,
        channel: BalancedChannelBase,
        method: str,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
    ) -> None:
        self._channel = channel
        self.method = method
        self.serializer = serializer
        self.deserializer = deserializer
        self.idempotent = is_idempotent(method)
        cfg = channel.config
        policy = cfg.method_config(method)
        self._timeout = policy.timeout
        self._retry = policy.retry or cfg.retry
        self._criticality = policy.criticality
        algorithm = compression_of(policy.compression)
        self._compression = None if algorithm is grpc.Compression.NoCompression else algorithm
        self._threshold = cfg.compression_threshold
        self._failovers = cfg.failover_attempts
        self._margin = cfg.deadline_margin
        self._metadata = cfg.metadata
        self._token: Callable[[], tuple[str, str]] | None = None
        if cfg.token is not None:  # a static token joins the fixed metadata; a refreshing one is asked per call
            fixed, self._token = token_parts(cfg.token)
            self._metadata = self._metadata + fixed
        self._budget = channel.retry_budget
        self._observer = channel.observer
        # Hedging resends a request that may already be executing: only for
        # methods whose contract says that is harmless, and only unary ones.
        hedge = policy.hedge if self.idempotent and self.kind == "unary_unary" else None
        self._hedge_state = None if hedge is None else channel.method_state(method, hedge)
        #: A unary call's fast path: with no observer to tell each step and no hedging, the front picks and
        #: sends the first attempt itself and reports its answer; anything else resumes ``unary_flow`` there.
        self._direct = self._observer is None and self._hedge_state is None and self.kind == "unary_unary"

    def _prepare(
        self,
        request: Any,
        timeout: float | None,
        metadata: Metadata | None,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> CallPlan:
        """The plan of this call's first attempt; its deadline starts now.

        Inside a handler (or a ``deadline_after`` block) the timeout is
        bounded by the inherited deadline; a call with no time left is
        refused here, before anything is sent.
        """
        if timeout is None:
            timeout = self._timeout
        scope = scope_var.get()
        now = time.monotonic()
        if scope is not None:
            try:
                timeout = bounded_timeout(timeout, scope.deadline, now, self._margin)
            except DeadlinePassed as exc:
                raise DeadlineExceeded(f"{self.method} not sent: {exc}") from None
        budget = self._budget
        if budget._from <= now < budget._until:  # RateBudget.deposit's common case, inlined: once per call
            budget._requests[budget._i] += 1
        else:
            budget.deposit(now)
        if self._metadata:
            metadata = self._metadata + tuple(metadata) if metadata else self._metadata
        if self._token is not None:
            header = self._token()
            metadata = (*metadata, header) if metadata else (header,)
        # Criticality: the caller's block, else the incoming call's (like its deadline), else the method's.
        criticality = criticality_var.get() or (scope.criticality if scope is not None else None) or self._criticality
        if criticality is not None:
            metadata = (*metadata, (CRITICALITY_KEY, criticality)) if metadata else ((CRITICALITY_KEY, criticality),)
        if compression is None and self._compression is not None:  # the caller's choice wins
            compression = self._compressed(request)
        deadline = None if timeout is None else now + timeout
        # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function (a frame per call).
        fields = (deadline, timeout, metadata, credentials, wait_for_ready, compression, scope, metadata, request, 1)
        return _new_plan(CallPlan, fields)

    def _compressed(self, request: Any) -> grpc.Compression | None:
        """The configured algorithm, or ``None`` for a unary request under the threshold.

        A request stream has no size known up front and is compressed whole.
        """
        return None if is_small(request, self._threshold) else self._compression

    def _hedge_delay(self, scope: CallScope | None) -> float | None:
        """Seconds before this call's first backup, or ``None`` not to hedge it."""
        state = self._hedge_state
        if state is None:
            return None
        state.budget.deposit(time.monotonic())  # every call of the method earns hedging budget
        if scope is not None and scope.is_retry:
            return None
        return state.latencies.delay(state.policy)

    def _ends_hedge(self, error: BaseException | None) -> bool:
        """Whether a hedged copy's failure ends the whole call (its status is not retryable).

        A copy a server refused unrun (shedding load, draining) says nothing
        of the others: they go on.
        """
        if error is None:
            return False
        if not isinstance(error, grpc.RpcError):
            return True
        return error.code().name not in self._retry.retryable_codes and not trailer_facts(error)[0]

    def _may_hedge(self) -> bool:
        """Spend one backup from the hedging budget (counted in stats)."""
        stats = self._channel.stats
        if self._hedge_state is not None and self._hedge_state.budget.try_withdraw(time.monotonic()):
            stats.hedges += 1
            return True
        stats.budget_refused += 1
        return False


__all__ = [
    "ATTEMPT_KEY",
    "HEALTH_BACKOFF",
    "BalancedChannelBase",
    "CallPlan",
    "CallStats",
    "Metadata",
    "MethodBase",
    "NoEndpointError",
    "SubchannelBase",
    "connectivity_of",
    "is_idempotent",
    "outcome_of",
    "outcome_of_error",
    "refused_draining",
    "remaining_timeout",
    "trailer_facts",
    "with_attempt",
]
