"""What both client fronts share: per-call preparation, outcome policy, balancing.

Every call, of every kind, on both fronts, goes through one
:class:`MethodBase` subclass instance made once per stub method. Per call it
applies the channel's policy (:meth:`MethodBase._prepare`: default timeout and
metadata), picks an endpoint from the balancer's current picker, sends the
call on that endpoint's grpc channel, reports the outcome to the pick's
done-callback, and fails over to another endpoint when that is safe
(:func:`may_fail_over`). The fronts only differ in how they wait.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from ..balancing.balancer import BalancerCore, Connectivity
from ..balancing.endpoint import EndpointStats, Outcome
from ..balancing.pickers import NoEndpointError, Pick, PickerContext
from ..balancing.resolver import Resolver, resolver_for
from ..config import ChannelConfig
from ..errors import Unavailable

Metadata = Sequence[tuple[str, str | bytes]]
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

# grpc's wording when a call could not be sent at all (connect failed, or the
# channel was already in TRANSIENT_FAILURE): safe to resend for any method.
_NEVER_SENT = re.compile(
    r"failed to connect|connection refused|connect failed|no route to host|"
    r"failed to pick subchannel|dns resolution failed|connections to all backends failing",
    re.IGNORECASE,
)


_AVOID_TRIES = 4  # re-picks to find another endpoint than the one that failed


def outcome_of(code: grpc.StatusCode) -> Outcome:
    """How a call's status counts for balancing and outlier detection."""
    if code is grpc.StatusCode.CANCELLED:
        return Outcome.IGNORED
    return Outcome.FAILURE if code in _ENDPOINT_FAILURES else Outcome.SUCCESS


def never_sent(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a failed call provably never left the client."""
    return code is grpc.StatusCode.UNAVAILABLE and bool(details) and _NEVER_SENT.search(details or "") is not None


def may_fail_over(code: grpc.StatusCode, details: str | None, idempotent: bool) -> bool:
    """Whether a failed call may be resent to another endpoint.

    Any call that never left the client may; one that was sent may only if
    its method has no side effects (or is idempotent) and the failure is the
    connection's (UNAVAILABLE), not an answer from the server's code.
    """
    if never_sent(code, details):
        return True
    return idempotent and code is grpc.StatusCode.UNAVAILABLE


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


class SubchannelBase:
    """One endpoint's grpc channel and its per-method multicallables."""

    def __init__(self, address: str, channel: Any) -> None:
        self.address = address
        self.channel = channel
        # Keyed by wrapper object: two wrappers of one method path may carry
        # different serializers (a typed stub and a raw-bytes call).
        self._calls: dict[MethodBase, Any] = {}

    def call(self, method: MethodBase) -> Any:
        """The grpc multicallable of ``method`` on this endpoint (cached)."""
        mc = self._calls.get(method)
        if mc is None:
            factory = getattr(self.channel, method.kind)
            mc = factory(method.method, method.serializer, method.deserializer, True)
            self._calls[method] = mc
        return mc


class BalancedChannelBase:
    """Resolver -> balancer core -> one grpc channel per endpoint."""

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
        )
        self._resolver = resolver_for(target, cfg.dns_refresh)

    @property
    def balancer(self) -> BalancerCore:
        """The balancer core (endpoint states, current picker)."""
        return self._core

    def endpoints(self) -> list[tuple[str, str]]:
        """(address, state) of every endpoint, for status pages and tests."""
        now = time.monotonic()
        return [(e.stats.address, e.describe(now).split(" ", 1)[1]) for e in self._core.entries()]

    def _pick_now(self, wait_for_ready: bool | None, avoid: EndpointStats | None = None) -> Pick:
        """Pick without waiting; Unavailable when nothing can take the call now.

        ``avoid`` is the endpoint a failed attempt of this call used: a
        failover goes elsewhere whenever the picker has another endpoint.
        """
        core = self._core
        picker = core.current()
        if core.all_failed and not wait_for_ready:
            raise Unavailable(core.reason)
        stats, done = picker.pick()
        if avoid is not None and len(picker.endpoints) > 1:
            for _ in range(_AVOID_TRIES):
                if stats is not avoid:
                    break
                done(Outcome.IGNORED, 0.0)
                stats, done = picker.pick()
        return stats, done


class MethodBase:
    """One stub method's wrapper: its identity and the channel's call policy."""

    __slots__ = ("_channel", "_metadata", "_timeout", "deserializer", "idempotent", "method", "serializer")

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
        self._timeout = channel.config.default_timeout
        self._metadata = channel.config.metadata

    def _prepare(self, timeout: float | None, metadata: Metadata | None) -> tuple[float | None, Metadata | None]:
        """The timeout and metadata this call is sent with."""
        if timeout is None:
            timeout = self._timeout
        if self._metadata:
            metadata = self._metadata + tuple(metadata) if metadata else self._metadata
        return timeout, metadata

    def _failover(self, exc: grpc.RpcError, attempt: int, deadline: float | None) -> tuple[bool, float | None]:
        """After a failed attempt: whether to try another endpoint, and its timeout."""
        if attempt >= self._channel.config.failover_attempts:
            return False, None
        if not may_fail_over(exc.code(), exc.details(), self.idempotent):
            return False, None
        if deadline is None:
            return True, None
        remaining = deadline - time.monotonic()
        return remaining > 0, remaining


def endpoint_of(stats: EndpointStats) -> Any:
    """The front's subchannel attached to an endpoint."""
    return stats.handle


__all__ = [
    "BalancedChannelBase",
    "Metadata",
    "MethodBase",
    "NoEndpointError",
    "SubchannelBase",
    "connectivity_of",
    "endpoint_of",
    "is_idempotent",
    "may_fail_over",
    "never_sent",
    "outcome_of",
]
