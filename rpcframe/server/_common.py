"""What the sync and asyncio servers share: servicer discovery and error policy.

rpcframe registers a servicer by running the generated
``add_XServicer_to_server`` function against a recorder instead of a real
server. That yields the service's full name and its method handlers, which
the server wraps (one wrapper per method, see ``_sync``/``_aio``) before
registering them for real.
"""

from __future__ import annotations

import logging
import operator
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from .._core.deadline import CallScope
from .._core.overload import CRITICALITIES, CRITICALITY_KEY, Admission, RateLimiter, Rejection, criticality_share
from .._core.retry import NOT_RUN_KEY, PUSHBACK_KEY
from ..config import ServerConfig
from ..errors import ConfigError, RpcError
from ..observe import CallObserver, ServerCallInfo, combine
from ..security.guard import Guard, authenticator
from ..security.tls import server_credentials

_LOG = logging.getLogger("rpcframe.server")

AddFunction = Callable[[Any, Any], None]
Handlers = dict[str, grpc.RpcMethodHandler]


@dataclass(frozen=True, slots=True)
class Service:
    """A service recorded from a generated ``add_..._to_server`` function."""

    name: str
    handlers: Handlers


class _Recorder:
    """Stands in for a grpc server while a generated add function runs."""

    def __init__(self) -> None:
        self.services: list[Service] = []
        self._generic: list[Any] = []

    def add_registered_method_handlers(self, name: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.services.append(Service(name, dict(handlers)))

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        self._generic.extend(generic_handlers)

    def result(self) -> list[Service]:
        if self.services:
            return self.services
        # Code from grpcio-tools older than 1.63 only registers a generic
        # handler; its name and method table are private attributes.
        found = []
        for gh in self._generic:
            name, methods = getattr(gh, "_name", None), getattr(gh, "_method_handlers", None)
            if isinstance(name, str) and isinstance(methods, dict):
                # grpcio keys that table by full path ("/pkg.Service/Method"): keep the method's name.
                found.append(Service(name, {path.rpartition("/")[2]: h for path, h in methods.items()}))
        return found


def find_add_function(servicer: object) -> AddFunction:
    """Locate the generated ``add_<Base>_to_server`` for a servicer instance."""
    for cls in type(servicer).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is None or not cls.__module__.endswith("_pb2_grpc"):
            continue
        add = getattr(module, f"add_{cls.__name__}_to_server", None)
        if callable(add):
            return add  # type: ignore[no-any-return]
    raise ConfigError(
        f"{type(servicer).__qualname__} does not derive from a generated *Servicer class; "
        "pass add_fn=<generated add_..._to_server function>"
    )


def record_services(servicer: object, add_fn: AddFunction | None = None) -> list[Service]:
    """The services (name and method handlers) a servicer provides."""
    recorder = _Recorder()
    (add_fn or find_add_function(servicer))(servicer, recorder)
    services = recorder.result()
    if not services:
        raise ConfigError(f"registering {type(servicer).__qualname__} produced no service")
    return services


class BadRequest:
    """Stands in for a request whose bytes did not parse.

    grpcio answers a request that fails to deserialize with INTERNAL (sync)
    or UNKNOWN plus the parser's message (asyncio). rpcframe's deserializer
    returns this marker instead, and the per-call wrapper ends the call with
    INVALID_ARGUMENT on both fronts.
    """

    __slots__ = ("details",)

    def __init__(self, details: str) -> None:
        self.details = details


def safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so bad bytes yield :class:`BadRequest`."""
    if deserialize is None:
        return None
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "message")

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return BadRequest(f"request is not a valid {type_name}: {exc}")

    return parse


def is_grpc_abort(exc: BaseException, context: Any) -> bool:
    """Whether ``exc`` is how grpcio ends a handler after ``context.abort()``.

    The sync server raises a bare ``Exception()`` once the status is set; the
    asyncio server raises ``grpc.aio.AbortError``. Either must propagate as is.
    """
    if isinstance(exc, grpc.aio.AbortError):
        return True
    return type(exc) is Exception and not exc.args and context.code() is not None


def status_for_exception(
    exc: BaseException, config: ServerConfig, method: str
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """The status a handler's exception ends its call with.

    Unmapped exceptions become INTERNAL with a short reference id; the
    traceback is logged with the same id and never reaches the client.
    """
    if isinstance(exc, RpcError):
        # A relay re-raising a downstream error must not pass on that
        # server's never-ran marker: this call did run.
        trailing = tuple(kv for kv in exc.trailing_metadata() if kv[0] != NOT_RUN_KEY)
        return exc.code(), exc.details(), trailing
    code = config.status_for(exc)
    if code is not None:
        return code, str(exc), ()
    ref = uuid.uuid4().hex[:12]
    _LOG.error("unhandled exception in %s (ref %s)", method, ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error (ref {ref})", ()


#: How a server ends a call it will not run because it is shutting down: the
#: client may send it elsewhere, whatever the method (see NOT_RUN_KEY).
NOT_RUN = (
    grpc.StatusCode.UNAVAILABLE,
    "the server is shutting down; the call was not run",
    ((NOT_RUN_KEY, "1"),),
)


#: Why a unary call ends with INVALID_ARGUMENT when its request never arrived whole.
NO_REQUEST = "the request message is missing or truncated (a unary method takes exactly one)"


#: Metadata that marks a request as a retry or hedge of an earlier attempt:
#: rpcframe's own, and the one grpc core's retries send.
RETRY_KEYS = frozenset({"rpcframe-attempt", "grpc-previous-rpc-attempts"})


_NO_DEADLINE = 1e9  # seconds; anything longer is grpc's infinite future


class IncomingScope(CallScope):
    """An incoming call's scope, read from its context only when first asked.

    Most handlers call nothing downstream: they never pay for reading the
    deadline and metadata. The deadline is the caller's (``grpc-timeout``),
    shortened to ``cap`` (``ServerConfig.max_deadline``, counted from the
    call's start) when that is sooner.
    """

    __slots__ = ("_cap_at", "context")

    def __init__(self, context: Any, cap: float | None) -> None:
        # CallScope's fields set here, not by super().__init__(): one frame
        # instead of two (or three for the thread-pool front's subclass) on
        # every incoming call. The deadline, retry flag and criticality are
        # set by _resolve, on first use (the properties read _pending first).
        self._pending = True
        self._parent_root = None  # a root: no cycle through itself (see CallScope)
        self.calls = None
        self.cancelled = self.ended = False
        self.context = context
        self._cap_at = None if cap is None else time.monotonic() + cap

    def _resolve(self) -> None:
        self._pending = False
        context = self.context
        remaining = context.time_remaining()
        # The sync server reports "no deadline" as about INT64_MAX seconds.
        deadline = None if remaining is None or remaining > _NO_DEADLINE else time.monotonic() + remaining
        cap_at = self._cap_at
        if cap_at is not None and (deadline is None or deadline > cap_at):
            deadline = cap_at
        self._deadline = deadline
        self._is_retry = False
        self._criticality = None
        for key, value in context.invocation_metadata() or ():
            if key in RETRY_KEYS:
                self._is_retry = True
            elif key == CRITICALITY_KEY and self._criticality is None and isinstance(value, str):
                if value.upper() in CRITICALITIES:  # the caller's text: only a known class is passed on
                    self._criticality = value.upper()


def _parse_safely(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    # Streamed requests too: the wrappers' request iterators turn a
    # BadRequest into INVALID_ARGUMENT (watched_requests, checked_requests).
    return handler._replace(request_deserializer=safe_deserializer(handler.request_deserializer))


async def checked_requests(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    """An asyncio request stream that ends the call with INVALID_ARGUMENT at a message that did not parse."""
    async for request in requests:
        if type(request) is BadRequest:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        yield request


# -- stalled streams on the thread-pool server --------------------------------

_CANCEL_CODE = grpc.StatusCode.RESOURCE_EXHAUSTED


class Stall:
    """What one thread-pool call waits on its client for, and since when.

    ``writing`` / ``reading`` hold the ``time.monotonic()`` at which a
    response write / request read began, 0.0 while the handler is not
    waiting on the client. ``fired`` is set once the watch ended the call.
    """

    __slots__ = ("context", "fired", "method", "reading", "writing")

    def __init__(self, context: Any, method: str) -> None:
        self.context = context
        self.method = method
        self.writing = 0.0
        self.reading = 0.0
        self.fired = False


class StallWatch:
    """Ends thread-pool calls whose client stops reading or sending.

    A sync handler that yields a response waits inside grpc until the
    client's HTTP/2 flow-control window takes it; one that iterates its
    request stream waits until the next message arrives. Each wait holds a
    worker thread, so a few clients that stop reading (or sending) would
    otherwise hold the whole pool for good. One daemon thread, alive only
    while streaming calls are open, checks their waits every ``tick``
    seconds and cancels a call that waited too long. The call ends with
    RESOURCE_EXHAUSTED and a message naming the setting; its thread is
    freed at once because grpc's write and read waits end on cancellation.
    """

    def __init__(self, write_timeout: float | None, read_timeout: float | None) -> None:
        self.write_timeout = write_timeout
        self.read_timeout = read_timeout
        limits = [t for t in (write_timeout, read_timeout) if t is not None]
        # A call ends between timeout and timeout + tick after its wait began.
        self.tick = min(1.0, max(0.01, min(limits) / 4)) if limits else 0.0
        self._stalls: set[Stall] = set()
        self._lock = threading.Lock()
        self._running = False

    def open(self, context: Any, method: str) -> Stall:
        """Watch a call from now until :meth:`close`."""
        stall = Stall(context, method)
        if self.tick:
            with self._lock:
                self._stalls.add(stall)
                if not self._running:
                    self._running = True
                    threading.Thread(target=self._run, name="rpcframe-stall-watch", daemon=True).start()
        return stall

    def close(self, stall: Stall) -> None:
        """Stop watching a call (it ended)."""
        self._stalls.discard(stall)

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            with self._lock:
                if not self._stalls:
                    self._running = False  # open() starts a new thread for the next call
                    return
                stalls = tuple(self._stalls)
            self._check(stalls, time.monotonic())

    def _check(self, stalls: tuple[Stall, ...], now: float) -> None:
        """End every call in ``stalls`` that has waited on its client too long."""
        write, read = self.write_timeout, self.read_timeout
        for stall in stalls:
            if stall.fired:
                continue
            since = stall.writing
            if write is not None and since and now - since > write:
                _end(stall, f"the client did not read the response stream for {write:g} s (stream_write_timeout)")
                continue
            since = stall.reading
            if read is not None and since and now - since > read:
                _end(stall, f"the client sent no request message for {read:g} s (stream_read_timeout)")


def _end(stall: Stall, details: str) -> None:
    stall.fired = True
    _LOG.warning("ending %s from %s: %s", stall.method, stall.context.peer(), details)
    # grpc's public cancel() ends the call with a bare CANCELLED; cancelling
    # the core call with a status sends that status in the trailers instead.
    call = getattr(getattr(stall.context, "_rpc_event", None), "call", None)
    try:
        call.cancel(_CANCEL_CODE.value[0], details)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - grpc internals changed: fall back to the public API
        stall.context.cancel()


def watched_requests(requests: Iterator[Any], context: Any, stall: Stall) -> Iterator[Any]:
    """A thread-pool request stream whose waits ``stall`` records.

    A message that did not parse ends the call with INVALID_ARGUMENT. When
    the watch ended the call, the handler's next read aborts it quietly
    (grpc may end a cancelled stream with StopIteration or an RpcError).
    """
    while True:
        stall.reading = time.monotonic()
        try:
            request = next(requests)
        except StopIteration:
            if stall.fired:
                context.abort(_CANCEL_CODE, "stalled stream ended")
            return
        except grpc.RpcError:
            if stall.fired:
                context.abort(_CANCEL_CODE, "stalled stream ended")
            raise
        finally:
            stall.reading = 0.0
        if type(request) is BadRequest:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        yield request


def watch_reads(behaviour: Callable[..., Any], watch: StallWatch, method: str) -> Callable[..., Any]:
    """A stream-unary behaviour whose request stream is watched and checked."""

    def run(requests: Iterator[Any], context: Any) -> Any:
        stall = watch.open(context, method)
        try:
            return behaviour(watched_requests(requests, context, stall), context)
        finally:
            watch.close(stall)

    return run


class ServerBase:
    """Registration and binding, identical for the sync and asyncio servers.

    Subclasses provide ``_wrap(method, handler)``, which returns the handler
    with rpcframe's one per-call server wrapper around its behaviour.
    """

    _grpc_server: Any
    _inflight = 0  # calls of added services being handled (the fronts count them)

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._services: list[Service] = []
        self._ports: list[int] = []
        self._started = False
        self._auth = authenticator(config.auth, config.tls)
        self.governor = Governor(config)
        self._observer = combine(config.observers)  # None: the wrapper observes nothing
        self._credentials: Any = None
        if self._observer is not None:
            self._observer.server_opened(self)

    @property
    def inflight(self) -> int:
        """Calls of added services being handled now."""
        return self._inflight

    def _guard_for(self, method: str) -> Guard | None:
        """The auth check of ``method``; None without ``ServerConfig.auth`` (then the wrapper checks nothing)."""
        return None if self._auth is None else self._auth.guard(method)

    def auth_denials(self) -> dict[str, int]:
        """Calls refused by authentication or policy so far, by reason."""
        return {} if self._auth is None else self._auth.denials()

    def shed(self) -> dict[str, int]:
        """Calls refused unrun by overload protection or rate limits so far, by reason."""
        return self.governor.shed()

    @property
    def service_names(self) -> tuple[str, ...]:
        """Full names of the services added so far (health/reflection excluded)."""
        return tuple(s.name for s in self._services)

    @property
    def ports(self) -> tuple[int, ...]:
        """Ports bound so far, in ``bind`` order (the real port when 0 was asked)."""
        return tuple(self._ports)

    def add(self, servicer: object, add_fn: AddFunction | None = None) -> tuple[str, ...]:
        """Serve ``servicer``, an instance of a generated ``*Servicer`` subclass.

        ``add_fn`` is the generated ``add_..._to_server`` function; it is found
        from the servicer's base class when omitted. Returns the service names.
        """
        if self._started:
            raise ConfigError("add() must be called before start()")
        services = record_services(servicer, add_fn)
        for service in services:
            if service.name in self.service_names:
                raise ConfigError(f"service {service.name} is already registered")
            wrapped = {m: self._wrap(f"/{service.name}/{m}", _parse_safely(h)) for m, h in service.handlers.items()}
            self._grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.name, wrapped),))
            self._grpc_server.add_registered_method_handlers(service.name, wrapped)
            self._services.append(service)
        return tuple(s.name for s in services)

    def bind(self, address: str) -> int:
        """Listen on ``host:port`` (TLS when ``config.tls`` is set); returns the port actually bound."""
        tls = self.config.tls
        if tls is not None and self._credentials is None:
            self._credentials = server_credentials(tls)  # one reloading credential for every port
        try:
            if tls is not None:
                port = int(self._grpc_server.add_secure_port(address, self._credentials))
            else:
                port = int(self._grpc_server.add_insecure_port(address))
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind {address}: {exc}") from None
        if port == 0:
            raise ConfigError(f"cannot bind {address}")
        self._ports.append(port)
        return port

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class Drain:
    """When a stopping server may send GOAWAY: its accepted calls are done and callers went quiet.

    From the start of the drain, calls that still arrive are refused unrun
    (:data:`NOT_RUN`; clients send them elsewhere). A GOAWAY sent while a
    client still sends would instead cancel the streams it opens before it
    reads the GOAWAY, unrun but unmarked. So the drain ends once nothing is
    in flight and no call has arrived for :attr:`QUIET` seconds, or, for
    callers that never stop (clients that do not watch health), once calls
    are done and :attr:`QUIET_MAX` has passed; never later than the grace.
    """

    QUIET = 0.05
    QUIET_MAX = 1.0
    POLL = 0.01  #: seconds between the server's checks of :meth:`over`
    #: grpc's own grace after a drain that ended with nothing in flight: only
    #: refusals can be running then, and a connection that ignores GOAWAY
    #: (an idle attacker) would otherwise hold the stop for the whole grace.
    CLOSE = 1.0

    __slots__ = ("_idle", "_last", "_start", "until")

    def __init__(self, now: float, grace: float) -> None:
        self._start = self._last = now
        self.until = now + grace
        self._idle = False

    def refused(self, now: float) -> None:
        """A call arrived (and was refused)."""
        self._last = now

    def over(self, now: float, busy: bool) -> bool:
        """Whether to stop waiting: ``busy`` says whether accepted calls are still running."""
        if now >= self.until:
            return True
        self._idle = not busy and (now - self._last >= self.QUIET or now - self._start >= self.QUIET_MAX)
        return self._idle

    def grace_left(self, now: float) -> float:
        """The grace to give grpc's own stop once :meth:`over` said so."""
        left = max(0.0, self.until - now)
        return min(left, self.CLOSE) if self._idle else left


def observe_received(observer: CallObserver, method: str, context: Any, request: Any = None) -> ServerCallInfo:
    """Tell the observer of an incoming call (it may raise an RpcError to refuse it).

    ``request`` is the request message (an iterator for request streams).
    """
    info = ServerCallInfo(method, context, time.perf_counter(), request)
    observer.call_received(info)
    return info


def observe_finished(observer: CallObserver, info: ServerCallInfo, exc: BaseException | None) -> None:
    """Tell the observer how the call ended: ``exc`` is what its handler raised (None: it returned)."""
    observer.call_finished(info, final_status(info.context, exc), time.perf_counter() - info.start)


def final_status(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    """The status a call ends with after its wrapper saw ``exc`` (None: OK)."""
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, RpcError):
        return exc.code()
    code = context.code()  # set by abort(), which every mapped error goes through
    if isinstance(code, grpc.StatusCode):
        return code
    cancelled = isinstance(exc, GeneratorExit) or type(exc).__name__ == "CancelledError"
    return grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN


# -- overload protection and rate limits -----------------------------------------


#: How a call refused before its handler ends: status, details, trailing metadata.
Refusal = tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]


def response_threshold(config: ServerConfig) -> int | None:
    """Bytes below which a response goes uncompressed; ``None`` (nothing to check) when none is compressed."""
    return None if config.compression in (None, "none") else config.compression_threshold


#: An incoming call's seconds left (grpc's context; None or over 1e9 without a deadline).
_time_remaining = operator.methodcaller("time_remaining")  # C: no Python frame of its own


def _share_of(context: Any) -> float:
    """The criticality share of an incoming call, from its ``rpcframe-criticality`` header."""
    for key, value in context.invocation_metadata() or ():
        if key == CRITICALITY_KEY:
            return criticality_share(value if isinstance(value, str) else None)
    return criticality_share(None)


class Governor:
    """A server's admission control and rate limits, as both fronts use them.

    Per method, the wrapper asks once for its :meth:`admission` and
    :meth:`rate_limiters`; per call, :meth:`limit` returns None to run it or
    the :data:`Refusal` to end it with, unrun (the client may send it
    elsewhere), and the admission's ``begin`` None or the rejection that
    :meth:`refusal` turns into one. The asyncio front keeps
    :attr:`queue_delay` current.
    """

    def __init__(self, config: ServerConfig) -> None:
        self._overload = config.overload
        self._limits = config.rate_limits
        self._admissions: list[Admission] = []  # one per method with per_method, else one for all
        self._shed: dict[str, int] = {}
        self._lock = threading.Lock()
        self._queue_delay = 0.0
        # The thread-pool front's waiting calls: with W workers each taking the
        # method's median time m, a call behind q others waits about q * m / W.
        self.queued: Callable[[], int] | None = None
        self._workers = config.max_workers

    @property
    def queue_delay(self) -> float:
        """The asyncio front's queueing delay (its event loop's lag), seconds; every admission reads it."""
        return self._queue_delay

    @queue_delay.setter
    def queue_delay(self, delay: float) -> None:
        self._queue_delay = delay
        for admission in self._admissions:
            admission.queue_delay = delay

    def shed(self) -> dict[str, int]:
        """Calls refused so far, by reason ("concurrency", "queue", "priority", "deadline", "rate_limit")."""
        with self._lock:
            return dict(self._shed)

    def admission(self, method: str, streaming: bool) -> Admission | None:
        """The admission control of ``method`` (shared by the server's methods unless per_method).

        Only unary methods are admitted this way: a stream's duration is its
        peer's pace as much as the server's load. Per call, the wrapper asks
        ``admission.begin(now, context)``, and ends an admitted call with
        ``admission.end(started, now)``; a refusal becomes a status with
        :meth:`refusal`.
        """
        cfg = self._overload
        if cfg is None or streaming:
            return None
        if self._admissions and not cfg.per_method:
            return self._admissions[0]
        admission = Admission(
            cfg, time.monotonic(), share=_share_of, remaining=_time_remaining,
            queued=self.queued, workers=self._workers,
        )  # fmt: skip
        admission.queue_delay = self._queue_delay
        self._admissions.append(admission)
        return admission

    def rate_limiters(self, method: str) -> tuple[RateLimiter, ...]:
        """The rate limits on ``method``, each with its own buckets."""
        now = time.monotonic()
        return tuple(RateLimiter(limit, now) for limit in self._limits if limit.applies_to(method))

    def limit(self, limiters: tuple[RateLimiter, ...], context: Any) -> Refusal | None:
        """None when every rate limit on the call has a token for it; else how to end it (unrun)."""
        now = time.monotonic()
        for limiter in limiters:
            caller = _caller(context) if limiter.limit.per_caller else ""
            wait = limiter.take(caller, now)
            if wait > 0:
                return self.refusal(Rejection("rate_limit", wait))
        return None

    def refusal(self, rejection: Rejection) -> Refusal:
        """How a call refused for ``rejection`` ends (unrun); counted in :meth:`shed`."""
        reason = rejection.reason
        with self._lock:
            self._shed[reason] = self._shed.get(reason, 0) + 1
        trailers: tuple[tuple[str, str], ...] = ((NOT_RUN_KEY, "1"),)
        if reason == "deadline":
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the call cannot finish before its deadline: not run", trailers
        pushback = str(max(1, round(rejection.retry_after * 1000)))
        what = "rate limit exceeded" if reason == "rate_limit" else f"server overloaded ({reason})"
        return (grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}: not run; retry after {pushback} ms",
                (*trailers, (PUSHBACK_KEY, pushback)))  # fmt: skip


def _caller(context: Any) -> str:
    """Who a rate limit per caller counts: the authenticated name, else "anonymous"."""
    from ..security.identity import peer

    identity = peer(context)
    return identity.principal if identity.principal else "anonymous"
