"""The one seam through which every call can be observed, client and server.

Set ``ChannelConfig(observers=(...))`` and ``ServerConfig(observers=(...))``;
each observer is a :class:`CallObserver` (override what you need). The
client's call flow and the server's one wrapper call them; with no observer
set nothing is allocated and nothing is called. Tracing, metrics and
overload control hang off this seam instead of wrapping the hot path.

Client events, per call::

    call_started -> (attempt_started -> attempt_ended)+ -> call_ended

An attempt is the first send, a retry, a failover (the previous attempt
provably never ran) or a hedge. Server events: ``call_received`` (before
the handler; after authentication, so ``identity`` is known) and
``call_ended``. Observers may refuse work: an :class:`rpcframe.RpcError`
raised by ``call_started`` fails the call before anything is sent; raised
by ``call_received`` it ends the incoming call with that status before the
handler runs. Any other exception from an observer is a bug in the
observer; it propagates.

Each event gets the call's info object; observers may keep their own state
on it in :attr:`CallInfo.slots` (keyed by the observer), e.g. a span.

State that is not a call event (a channel's endpoints and their health,
in-flight calls, outlier ejections, retry-budget refusals; a server's
authentication denials) is read, not pushed: a channel or server created
with an observer hands itself over once, through ``channel_opened`` or
``server_opened``, as an :class:`ObservedChannel` or :class:`ObservedServer`,
and a metrics observer reads it when it is scraped. The calls pay nothing
for it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import grpc
from google.protobuf import descriptor_pool

__all__ = [
    "AttemptInfo", "CallInfo", "CallObserver", "EndpointState", "MethodLabels", "ObservedChannel",
    "ObservedServer", "ServerCallInfo", "StateReader", "combine",
]  # fmt: skip

_MAX_UNKNOWN = 1024  # method names remembered as "other"; past that they are looked up each time


class CallInfo:
    """One client call, as observers see it."""

    __slots__ = ("added", "deadline", "kind", "metadata", "method", "request", "slots", "start", "target")

    def __init__(
        self, method: str, kind: str, target: str, deadline: float | None, metadata: Any, start: float,
        request: Any = None,
    ) -> None:
        self.method = method  #: "/pkg.Service/Method"
        self.kind = kind  #: "unary_unary", "unary_stream", "stream_unary" or "stream_stream"
        self.target = target  #: the channel's target
        self.deadline = deadline  #: absolute time.monotonic() deadline, or None
        self.metadata = metadata  #: what the caller asked to send (observers add with add_metadata)
        self.start = start  #: time.perf_counter() when the call began
        self.request = request  #: the request message (an iterator for request streams)
        self.slots: dict[object, Any] = {}  #: per-observer state
        self.added: list[tuple[str, str]] = []  #: headers observers added in call_started

    @property
    def sent_bytes(self) -> int | None:
        """Serialized size of the request message (None for request streams)."""
        return _size(self.request)

    def add_metadata(self, key: str, value: str) -> None:
        """From ``call_started``: send this header with every attempt (e.g. W3C ``traceparent``)."""
        self.added.append((key, value))


class AttemptInfo:
    """One attempt of a call: which endpoint, which number, and why it was sent."""

    __slots__ = ("added", "endpoint", "number", "reason", "response", "slots", "start")

    def __init__(self, endpoint: str, number: int, reason: str, start: float) -> None:
        self.endpoint = endpoint  #: "host:port" the attempt went to
        self.number = number  #: 1 for the first attempt
        self.reason = reason  #: "first", "retry", "failover" or "hedge"
        self.start = start  #: time.perf_counter() when it was sent
        self.response: Any = None  #: the response message, when the attempt answered (unary responses)
        self.slots: dict[object, Any] = {}
        self.added: list[tuple[str, str]] = []  #: headers observers added in attempt_started

    def add_metadata(self, key: str, value: str) -> None:
        """From ``attempt_started``: send this header with this attempt only (e.g. its span's ``traceparent``)."""
        self.added.append((key, value))

    @property
    def received_bytes(self) -> int | None:
        """Serialized size of the response, when the attempt answered with one."""
        return _size(self.response)


def _size(message: Any) -> int | None:
    if type(message) is tuple:  # with_call's (response, call)
        message = message[0]
    byte_size = getattr(message, "ByteSize", None)
    return byte_size() if callable(byte_size) else None


class ServerCallInfo:
    """One incoming call, as observers see it."""

    __slots__ = ("context", "method", "request", "response", "slots", "start")

    def __init__(self, method: str, context: Any, start: float, request: Any = None) -> None:
        self.method = method  #: "/pkg.Service/Method"
        self.context = context  #: grpc's ServicerContext (peer(), invocation_metadata(), ...)
        self.start = start  #: time.perf_counter() when the wrapper began
        self.request = request  #: the request message (an iterator for request streams)
        self.response: Any = None  #: the response message, once a unary-response handler returned it
        self.slots: dict[object, Any] = {}

    @property
    def received_bytes(self) -> int | None:
        """Serialized size of the request message (None for request streams)."""
        return _size(self.request)

    @property
    def sent_bytes(self) -> int | None:
        """Serialized size of the response, once the handler returned one (None for response streams)."""
        return _size(self.response)

    @property
    def identity(self) -> Any:
        """Who is calling (:func:`rpcframe.peer`): read from the call when first asked."""
        from .security.identity import peer

        return peer(self.context)

    @property
    def deadline(self) -> float | None:
        """Seconds the caller left for the call, or None."""
        remaining = self.context.time_remaining()
        return None if remaining is None or remaining > 1e9 else float(remaining)


class EndpointState(NamedTuple):
    """One endpoint of a channel, as a metrics observer reads it."""

    address: str  #: "host:port"
    #: READY, IDLE, CONNECTING, TRANSIENT_FAILURE, SHUTDOWN (grpc's connectivity),
    #: NOT_SERVING (connected, health check says no), DRAINING (connected, refused a call as shutting
    #: down) or EJECTED (outlier detection).
    state: str
    in_flight: int  #: calls started on it and not ended
    ejections: int  #: times outlier detection ejected it


class ObservedChannel(Protocol):
    """What a client channel shows observers (:meth:`CallObserver.channel_opened`)."""

    @property
    def target(self) -> str:
        """The channel's target."""

    @property
    def closed(self) -> bool:
        """True once the channel was closed (observers stop reporting it)."""

    def counters(self) -> Mapping[str, int]:
        """Totals so far: ``retries``, ``failovers``, ``hedges``, ``hedge_wins``, ``budget_refused``."""

    def endpoint_states(self) -> list[EndpointState]:
        """Every endpoint's state now."""


class ObservedServer(Protocol):
    """What a server shows observers (:meth:`CallObserver.server_opened`)."""

    @property
    def inflight(self) -> int:
        """Calls whose handler is running."""

    def shed(self) -> Mapping[str, int]:
        """Calls refused unrun by overload protection or rate limits so far, by reason
        ("concurrency", "queue", "priority", "deadline", "rate_limit")."""

    def auth_denials(self) -> Mapping[str, int]:
        """Calls refused by authentication or policy so far, by reason (:data:`rpcframe.security.DENIAL_REASONS`)."""


class CallObserver:
    """Receives call events; every method is a no-op until overridden."""

    def channel_opened(self, channel: ObservedChannel) -> None:
        """A client channel with this observer was created (keep a weak reference to read its state)."""

    def server_opened(self, server: ObservedServer) -> None:
        """A server with this observer was created (keep a weak reference to read its state)."""

    def call_started(self, call: CallInfo) -> None:
        """A client call is about to pick its first endpoint."""

    def attempt_started(self, call: CallInfo, attempt: AttemptInfo) -> None:
        """An attempt was sent."""

    def attempt_ended(
        self, call: CallInfo, attempt: AttemptInfo, status: grpc.StatusCode, latency: float
    ) -> None:
        """An attempt ended with ``status`` after ``latency`` seconds (a cancelled hedge: CANCELLED)."""

    def call_ended(self, call: CallInfo, status: grpc.StatusCode, attempts: int, latency: float) -> None:
        """The call ended (for a streaming response: when its stream was opened or failed)."""

    def call_received(self, call: ServerCallInfo) -> None:
        """An incoming call passed authentication; its handler runs next."""

    def call_finished(self, call: ServerCallInfo, status: grpc.StatusCode, latency: float) -> None:
        """An incoming call's handler returned or raised."""


class _Fanout(CallObserver):
    """Several observers as one, called in order."""

    def __init__(self, observers: Sequence[CallObserver]) -> None:
        self._observers = tuple(observers)

    def channel_opened(self, channel: ObservedChannel) -> None:
        for observer in self._observers:
            observer.channel_opened(channel)

    def server_opened(self, server: ObservedServer) -> None:
        for observer in self._observers:
            observer.server_opened(server)

    def call_started(self, call: CallInfo) -> None:
        for observer in self._observers:
            observer.call_started(call)

    def attempt_started(self, call: CallInfo, attempt: AttemptInfo) -> None:
        for observer in self._observers:
            observer.attempt_started(call, attempt)

    def attempt_ended(self, call: CallInfo, attempt: AttemptInfo, status: grpc.StatusCode, latency: float) -> None:
        for observer in self._observers:
            observer.attempt_ended(call, attempt, status, latency)

    def call_ended(self, call: CallInfo, status: grpc.StatusCode, attempts: int, latency: float) -> None:
        for observer in self._observers:
            observer.call_ended(call, status, attempts, latency)

    def call_received(self, call: ServerCallInfo) -> None:
        for observer in self._observers:
            observer.call_received(call)

    def call_finished(self, call: ServerCallInfo, status: grpc.StatusCode, latency: float) -> None:
        for observer in self._observers:
            observer.call_finished(call, status, latency)


class MethodLabels:
    """A bounded method label for metrics: ``pkg.Service/Method`` if the descriptor pool knows it, else "other".

    A caller inventing method names cannot grow a metric's label set.
    """

    def __init__(self) -> None:
        self._known: dict[str, str] = {}
        self._unknown: set[str] = set()

    def __call__(self, method: str) -> str:
        label = self._known.get(method)
        if label is not None:
            return label
        if method in self._unknown:
            return "other"
        name = method[1:] if method.startswith("/") else method
        try:
            descriptor_pool.Default().FindMethodByName(name.replace("/", "."))
        except KeyError:
            if len(self._unknown) < _MAX_UNKNOWN:
                self._unknown.add(method)
            return "other"
        self._known[method] = name
        return name


#: The states :attr:`EndpointState.state` takes (a metrics observer reports each, 1 for the current one).
ENDPOINT_STATES = ("READY", "IDLE", "CONNECTING", "TRANSIENT_FAILURE", "SHUTDOWN", "NOT_SERVING", "DRAINING", "EJECTED")


class _Watched:
    """One channel a reader reports, and its counters when last read."""

    __slots__ = ("last", "ref", "target")

    def __init__(self, channel: ObservedChannel) -> None:
        self.ref = weakref.ref(channel)
        self.target = channel.target
        self.last: Mapping[str, int] = {}


class StateReader:
    """The channels and servers handed to a metrics observer, read when metrics are collected.

    Holds them weakly. Channel counters stay monotonic: the totals of a
    channel that was closed (or collected: then as last read) are folded
    into its target's, so churned channels cost one entry per target.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: list[_Watched] = []
        self._retired: dict[str, dict[str, int]] = {}  # target -> totals of channels gone
        self._servers: weakref.WeakSet[Any] = weakref.WeakSet()

    def add_channel(self, channel: ObservedChannel) -> None:
        """Report ``channel`` from now on."""
        with self._lock:
            self._channels.append(_Watched(channel))

    def add_server(self, server: ObservedServer) -> None:
        """Report ``server`` from now on."""
        with self._lock:
            self._servers.add(server)

    def _open_channels(self) -> list[tuple[_Watched, ObservedChannel]]:
        """Read every channel's counters; fold the ones gone into their target's totals."""
        live, kept = [], []
        for watched in self._channels:
            channel = watched.ref()
            if channel is not None:
                watched.last = channel.counters()
            if channel is None or channel.closed:
                retired = self._retired.setdefault(watched.target, {})
                for name, count in watched.last.items():
                    retired[name] = retired.get(name, 0) + count
                continue
            kept.append(watched)
            live.append((watched, channel))
        self._channels = kept
        return live

    def client_counters(self) -> dict[tuple[str, str], int]:
        """(target, counter name) -> total over every channel to that target, open or gone."""
        with self._lock:
            live = self._open_channels()
            totals = {(target, name): n for target, counts in self._retired.items() for name, n in counts.items()}
            for watched, _ in live:
                for name, count in watched.last.items():
                    totals[watched.target, name] = totals.get((watched.target, name), 0) + count
            return totals

    def endpoints(self) -> list[tuple[str, EndpointState]]:
        """(target, state) of every endpoint of every open channel."""
        with self._lock:
            channels = [channel for _, channel in self._open_channels()]
        return [(channel.target, state) for channel in channels for state in channel.endpoint_states()]

    def servers(self) -> list[ObservedServer]:
        """The servers still alive."""
        with self._lock:
            return list(self._servers)

    def server_totals(self, counts: Callable[[ObservedServer], Mapping[str, int]]) -> dict[str, int]:
        """``counts(server)`` summed over the servers, by key (e.g. auth denials by reason)."""
        totals: dict[str, int] = {}
        for server in self.servers():
            for key, n in counts(server).items():
                totals[key] = totals.get(key, 0) + n
        return totals


def combine(observers: Sequence[CallObserver]) -> CallObserver | None:
    """One observer for a config's ``observers``: None (nothing to call) when there are none."""
    if not observers:
        return None
    if len(observers) == 1:
        return observers[0]
    return _Fanout(observers)
