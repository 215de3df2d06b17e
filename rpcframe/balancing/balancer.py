"""The balancer's state machine, shared by the sync and asyncio fronts.

It keeps one entry per resolved endpoint (connectivity, health, stats) and
publishes a new immutable picker whenever something changes. It does no
I/O: the fronts own the grpc channels, watch connectivity and health, and
report here. All mutations hold one lock, so the sync front's grpc callback
threads, health threads and callers can report concurrently; picks read the
current picker without locking.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .._core.throttle import AdaptiveThrottle, ThrottleConfig
from .endpoint import Endpoint, EndpointStats, backend_address
from .outlier import OutlierConfig, update_ejections
from .pickers import Picker, PickerContext, build_picker, uses_peak_ewma

__all__ = ["BalancerCore", "Connectivity", "EndpointEntry"]


class Connectivity(enum.Enum):
    """Connection state of one endpoint (grpc's channel states)."""

    IDLE = "IDLE"
    CONNECTING = "CONNECTING"
    READY = "READY"
    TRANSIENT_FAILURE = "TRANSIENT_FAILURE"
    SHUTDOWN = "SHUTDOWN"


@dataclass
class EndpointEntry:
    """What the balancer knows of one endpoint."""

    stats: EndpointStats
    connectivity: Connectivity = Connectivity.IDLE
    serving: bool = True  # until the health watch says otherwise
    #: The server refused a call unrun because it is shutting down: out of the picker until the
    #: connection changes state (the server's GOAWAY, then a connection to whatever serves next).
    draining: bool = False
    health_detail: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def state(self, now: float) -> str:
        """grpc's connectivity name, or NOT_SERVING / EJECTED for a connected endpoint the picker skips."""
        if self.connectivity is not Connectivity.READY:
            return self.connectivity.name
        if not self.serving:
            return "NOT_SERVING"
        if self.draining:
            return "DRAINING"
        return "EJECTED" if self.stats.ejected_until > now else "READY"

    def describe(self, now: float) -> str:
        state = self.state(now)
        if state == "NOT_SERVING":
            return f"{self.stats.address} {self.health_detail or state}"
        if state == "DRAINING":
            return f"{self.stats.address} draining (it refused a call unrun: shutting down)"
        if state == "EJECTED":
            return f"{self.stats.address} ejected for {self.stats.ejected_until - now:.1f}s after repeated failures"
        return f"{self.stats.address} {state}"


class BalancerCore:
    """Endpoint states in, pickers out."""

    def __init__(
        self,
        target: str,
        policy: str,
        context: PickerContext,
        *,
        outlier: OutlierConfig | None = None,
        panic_threshold: float = 0.5,
        ewma_decay: float = 10.0,
        throttle: ThrottleConfig | None = None,
    ) -> None:
        self.target = target
        self.policy = policy
        self.context = context
        self.outlier = outlier or OutlierConfig()
        self.panic_threshold = panic_threshold
        self._ewma_decay = ewma_decay
        self._throttle = throttle
        self._lock = threading.RLock()
        self._entries: dict[str, EndpointEntry] = {}
        self._resolved = False
        self._listeners: list[Callable[[], None]] = []
        self.panic = False
        self.fallback = False
        self.all_failed = False
        self.reason = f"{target}: resolving"
        self.picker: Picker = build_picker(policy, (), context, f"{target}: resolving")
        #: When the earliest ejection ends (``inf``: none is ejected); :meth:`current` rebuilds the picker then.
        self.expires_at = math.inf

    # -- reports from the fronts --------------------------------------------

    def set_endpoints(
        self, endpoints: Sequence[Endpoint], attach: Callable[[EndpointEntry], None] | None = None
    ) -> tuple[list[EndpointEntry], list[EndpointEntry]]:
        """Apply a resolver update; returns (added, removed) entries.

        ``attach`` runs for each new entry before any picker can hand it out
        (the front creates the endpoint's channel there). Entries for
        addresses that stay keep their statistics; in-flight calls on removed
        endpoints are not touched (the front closes their channels later).
        """
        with self._lock:
            wanted = {e.address: e for e in endpoints}
            removed = [self._entries.pop(a) for a in list(self._entries) if a not in wanted]
            added = []
            for address, endpoint in wanted.items():
                entry = self._entries.get(address)
                if entry is None:
                    entry = self._new_entry(endpoint)
                    added.append(entry)
                elif entry.stats.endpoint != endpoint:
                    entry.stats.endpoint = endpoint  # new weight/zone, same connection
                self._entries[address] = entry
            if attach is not None:
                for entry in added:
                    attach(entry)
            # Keep resolver order (pick_first depends on it).
            self._entries = {a: self._entries[a] for a in wanted}
            self._resolved = True
            self._rebuild()
        return added, removed

    def renew(
        self, address: str, attach: Callable[[EndpointEntry], None], serving: bool = True
    ) -> EndpointEntry | None:
        """Replace ``address``'s entry by a new one in its place (the front attaches a new connection).

        ``serving=False``: the new entry gets no pick until its health watch
        says SERVING (a replacement can land on the draining worker again).
        Returns the old entry, for the front to close once its calls are
        done; None when ``address`` has no entry (any more).
        """
        with self._lock:
            old = self._entries.get(address)
            if old is None:
                return None
            entry = self._new_entry(old.stats.endpoint)
            entry.serving = serving
            attach(entry)
            self._entries[address] = entry
            self._rebuild()
        return old

    def _new_entry(self, endpoint: Endpoint) -> EndpointEntry:
        stats = EndpointStats(
            endpoint, self.context.clock, decay=self._ewma_decay, failure_threshold=self.outlier.consecutive_failures,
        )  # fmt: skip
        stats.peak_ewma = uses_peak_ewma(self.policy)
        if self._throttle is not None:
            stats.throttle = AdaptiveThrottle(self._throttle, self.context.clock())
        return EndpointEntry(stats)

    def set_connectivity(self, address: str, state: Connectivity, handle: object = None) -> None:
        """An endpoint's channel changed state (ignored when ``handle`` is given and is no longer the entry's)."""
        with self._lock:
            entry = self._entries.get(address)
            if entry is None or entry.connectivity is state or _stale(entry, handle):
                return
            became_ready = state is Connectivity.READY
            entry.connectivity = state
            entry.draining = False  # a draining server's connection closes; the next one is new
            if became_ready:
                self._mark_returning(entry)
            self._rebuild()

    def set_serving(self, address: str, serving: bool, detail: str = "", handle: object = None) -> None:
        """An endpoint's health watch reported a status (ignored when ``handle`` is no longer the entry's)."""
        with self._lock:
            entry = self._entries.get(address)
            if entry is None or _stale(entry, handle):
                return
            entry.health_detail = detail
            if entry.serving is serving:
                return  # a repeated status (e.g. the first SERVING) changes no pick
            entry.serving = serving
            if serving:
                self._mark_returning(entry)
            self._rebuild()

    def set_draining(self, stats: EndpointStats) -> None:
        """``stats``'s server refused a call unrun as shutting down: pick others until its connection changes.

        Its health watch says NOT_SERVING too, but a little later (or never,
        without health checking); meanwhile every call picked there would be
        refused and sent elsewhere, and a call refused by each endpoint in
        turn (one draining, one shedding load) runs out of failovers.
        """
        with self._lock:
            entry = self._entries.get(stats.address)
            if entry is None or entry.stats is not stats or entry.draining:
                return
            entry.draining = True
            self._rebuild()

    def refresh(self) -> None:
        """Rebuild the picker (after an outlier report or an ejection expiry)."""
        with self._lock:
            self._rebuild()

    def current(self) -> Picker:
        """The picker to use now (rebuilt first if an ejection has expired)."""
        if self.expires_at <= self.context.clock():
            self.refresh()
        return self.picker

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every picker rebuild (wakes waiting calls)."""
        self._listeners.append(listener)

    def aggregate(self) -> Connectivity:
        """One state for the whole target (READY if any endpoint is, ...)."""
        states = {e.connectivity for e in self._entries.values()}
        for state in (Connectivity.READY, Connectivity.CONNECTING, Connectivity.IDLE, Connectivity.TRANSIENT_FAILURE):
            if state in states:
                return state
        return Connectivity.IDLE

    def entries(self) -> list[EndpointEntry]:
        """A snapshot of the endpoint entries, in resolver order."""
        with self._lock:
            return list(self._entries.values())

    # -- internals -------------------------------------------------------------

    def _mark_returning(self, entry: EndpointEntry) -> None:
        # Slow start only matters when others already carry the traffic.
        others = any(e is not entry and e.connectivity is Connectivity.READY for e in self._entries.values())
        entry.stats.ready_since = self.context.clock() if others else -math.inf

    def _rebuild(self) -> None:
        now = self.context.clock()
        # A draining server refuses every call: it is left out even where panic or fallback would
        # spread calls over endpoints the picker otherwise skips.
        ready = [e for e in self._entries.values() if e.connectivity is Connectivity.READY and not e.draining]
        self.expires_at = update_ejections([e.stats for e in ready], self.outlier, now)
        usable = [e.stats for e in ready if e.serving and e.stats.ejected_until <= now]
        # Counted in servers: a server with some connections serving (the others reach a worker that drains) is healthy.
        self.panic = bool(ready) and _servers(usable) < self.panic_threshold * _servers(e.stats for e in ready)
        if self.panic:
            usable = [e.stats for e in ready]  # too few healthy: spread over all connected
        self.fallback = not usable and bool(self._entries)
        self.all_failed = self.fallback and all(
            e.connectivity is Connectivity.TRANSIENT_FAILURE for e in self._entries.values()
        )
        if self.fallback:
            # Nothing is ready: hand calls to a connecting endpoint and let
            # grpc queue them (or fail them, when all have failed and the
            # caller did not ask to wait for ready).
            entries = self._entries.values()
            usable = [e.stats for e in entries if e.connectivity is not Connectivity.SHUTDOWN and not e.draining]
        self.reason = self._reason(now)
        self.picker = (
            build_picker("round_robin", usable, self.context, self.reason)
            if self.fallback
            else (build_picker(self.policy, usable, self.context, self.reason))
        )
        for listener in self._listeners:
            listener()

    def _reason(self, now: float) -> str:
        if not self._resolved:
            return f"{self.target}: resolving"
        if not self._entries:
            return f"{self.target}: the resolver returned no endpoints"
        states = "; ".join(e.describe(now) for e in self._entries.values())
        return f"{self.target}: no ready endpoint ({states})"


def _servers(entries: Iterable[EndpointStats]) -> int:
    """Distinct servers among ``entries`` (the extra connections to one address count once)."""
    return len({backend_address(e.address) for e in entries})


def _stale(entry: EndpointEntry, handle: object) -> bool:
    """Whether a report comes from a connection the entry no longer has (replaced by :meth:`BalancerCore.renew`)."""
    return handle is not None and entry.stats.handle is not handle
