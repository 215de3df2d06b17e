"""Frozen configuration objects, validated once when they are built.

Every field has a documented default; ``dataclasses.replace`` derives a
variant. Values are checked in ``__post_init__`` so a bad setting fails where
it is written, with a :class:`~rpcframe.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from ._core.budget import BudgetConfig
from ._core.hedge import HedgePolicy
from ._core.overload import OverloadConfig, RateLimit, check_criticality
from ._core.retry import RetryPolicy
from ._core.throttle import ThrottleConfig
from .balancing.outlier import OutlierConfig
from .balancing.pickers import available_policies
from .errors import DEFAULT_EXCEPTION_STATUS, ConfigError
from .observe import CallObserver
from .security.auth import AuthConfig
from .security.tls import TLSConfig
from .security.tokens import TokenSource

__all__ = [
    "BudgetConfig",
    "OverloadConfig",
    "RateLimit",
    "ThrottleConfig",
    "ChannelConfig",
    "GrpcOptions",
    "HedgePolicy",
    "MethodConfig",
    "OutlierConfig",
    "RetryPolicy",
    "ServerConfig",
]

GrpcOptions = tuple[tuple[str, Any], ...]

_USER_AGENT = "rpcframe-python"
_MiB = 1024 * 1024
_INT_MAX = 2**31 - 1
_EDGE_STREAMS = 100  # Envoy edge best practice: concurrent streams per connection
_MAX_CONNECTIONS = 256  # per endpoint: each is a grpc channel with its own health watch


def _check_positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


#: Algorithms grpcio compresses messages with, by config name.
_COMPRESSION = {
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
    "none": grpc.Compression.NoCompression,
}


def compression_of(name: str | None) -> grpc.Compression | None:
    """grpc's enum for a config compression name; ``None`` for ``None``."""
    return None if name is None else _COMPRESSION[name]


def is_small(message: Any, threshold: int) -> bool:
    """Whether ``message`` serializes to fewer than ``threshold`` bytes (a protobuf message or bytes).

    Anything else (a request stream) has no size known up front: not small.
    Client requests and server responses under the compression threshold go uncompressed.
    """
    if hasattr(message, "ByteSize"):
        return bool(message.ByteSize() < threshold)
    return isinstance(message, bytes | bytearray | memoryview) and len(message) < threshold


def _check_compression(name: str, value: str | None, threshold: int) -> None:
    if value is not None and value not in _COMPRESSION:
        raise ConfigError(f"{name} must be one of {', '.join(_COMPRESSION)} or None, got {value!r}")
    if threshold < 0:
        raise ConfigError(f"compression_threshold must be >= 0 bytes, got {threshold!r}")


def _check_size(name: str, value: int) -> None:
    # -1 is grpc's "unlimited"; 0 would refuse every message.
    if value != -1 and value <= 0:
        raise ConfigError(f"{name} must be > 0 bytes or -1 for unlimited, got {value!r}")


def _ms(seconds: float) -> int:
    # grpc reads these as C ints: longer than ~24 days would overflow.
    return min(int(seconds * 1000), _INT_MAX)


def _override(own: GrpcOptions, extra: GrpcOptions) -> GrpcOptions:
    """``own`` with ``extra`` applied: grpc keeps the first of two equal keys, so a replaced key must go."""
    replaced = {key for key, _ in extra}
    return tuple(option for option in own if option[0] not in replaced) + extra


def _keepalive_options(time_s: float | None, timeout_s: float, permit_without_calls: bool) -> GrpcOptions:
    if time_s is None:
        return ()
    return (
        ("grpc.keepalive_time_ms", int(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(permit_without_calls)),
    )


@dataclass(frozen=True, slots=True)
class MethodConfig:
    """Call policy for one service or method, overriding the channel's defaults.

    ``None`` fields keep the channel's value. Keys of ``ChannelConfig.methods``
    are ``"pkg.Service/Method"`` or ``"pkg.Service"`` (every method of it);
    the most specific key wins.

    Attributes:
        timeout: default seconds per call (the caller's ``timeout=`` wins).
        retry: retry policy; ``RetryPolicy(max_attempts=1)`` turns retries off.
        hedge: hedging policy; only applies to unary methods the contract
            marks ``NO_SIDE_EFFECTS`` or ``IDEMPOTENT``.
        criticality: sent with the method's calls (``rpcframe-criticality``)
            when neither the caller (``with rpcframe.criticality(...)``) nor
            the incoming call being handled set one: ``CRITICAL_PLUS``,
            ``CRITICAL``, ``SHEDDABLE_PLUS`` or ``SHEDDABLE``. An overloaded
            rpcframe server refuses the least critical first.
        compression: ``"gzip"``, ``"deflate"`` or ``"none"`` for the
            method's requests (subject to the channel's
            ``compression_threshold``); ``None`` keeps the channel's.
    """

    timeout: float | None = None
    retry: RetryPolicy | None = None
    hedge: HedgePolicy | None = None
    criticality: str | None = None
    compression: str | None = None

    def __post_init__(self) -> None:
        _check_positive("timeout", self.timeout)
        _check_compression("compression", self.compression, 0)
        if self.criticality is not None:
            object.__setattr__(self, "criticality", check_criticality(self.criticality))


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """How a client channel connects and calls.

    Attributes:
        default_timeout: seconds allowed per call when the caller gives no
            ``timeout``; ``None`` (default) means no deadline, as in grpcio.
        metadata: key/value pairs added to every call (before per-call ones).
        max_send_message_length: bytes; -1 for unlimited. Default 4 MiB.
        max_receive_message_length: bytes; -1 for unlimited. Default 4 MiB.
        keepalive_time: seconds between HTTP/2 keepalive pings; ``None`` off.
        keepalive_timeout: seconds to wait for a ping's answer.
        keepalive_permit_without_calls: ping even when no call is active.
        user_agent: prefix of the ``user-agent`` header.
        grpc_options: extra raw grpc channel arguments; one with the key of an
            argument rpcframe sets replaces it.
        policy: how each call picks an endpoint: ``filtered_p2c`` (default:
            power of two choices on latency x in-flight among the endpoints
            that are not latency outliers, the others probed now and then),
            ``peak_ewma``, ``least_request``, ``round_robin``,
            ``weighted_round_robin``, ``pick_first`` or a name given to
            ``register_policy``.
        health_check: watch each endpoint's grpc.health.v1 status and keep
            NOT_SERVING / SERVICE_UNKNOWN endpoints out of picks.
        health_service: service name to watch ("" = the whole server).
        outlier: passive outlier detection (consecutive failures -> ejection).
        throttle: client-side adaptive throttling per endpoint
            (:class:`~rpcframe.ThrottleConfig`, the SRE book's formula): an
            endpoint that refuses most calls as overloaded gets a matching
            share of them refused locally instead (sent elsewhere when
            possible); ``None`` turns it off.
        slow_start: seconds over which an endpoint that joins or returns
            ramps up to its full share (0 turns it off).
        panic_threshold: when fewer than this share of connected endpoints
            is healthy, spread calls over all connected ones (0 disables).
        ewma_decay: seconds of the peak-EWMA latency decay (``peak_ewma``).
        dns_refresh: seconds between DNS re-resolutions (``dns:///`` targets).
        failover_attempts: extra endpoints tried, at once, when a call fails
            before its request left the client (any method); sent calls
            follow ``retry``.
        close_grace: seconds a removed endpoint's channel stays open for its
            in-flight calls.
        retry: how sent calls that failed are retried (see
            :mod:`rpcframe._core.retry`): by default up to 3 attempts on
            UNAVAILABLE for NO_SIDE_EFFECTS / IDEMPOTENT methods only.
        retry_budget: retries allowed as a share of the channel's requests
            (20 % plus 10 per second over 10 s).
        hedge: hedging for every idempotent unary method; ``None`` (default)
            hedges only the methods ``methods`` gives a policy.
        methods: per-service or per-method overrides (timeout, retry, hedge).
        deadline_margin: seconds taken off an inherited deadline for calls
            made while handling a call, so the answer can still travel back.
        tls: connect with TLS (:class:`~rpcframe.security.TLSConfig`; a
            client certificate in it for mTLS); ``None`` is plaintext.
        token: credential sent with every call: a string (``authorization:
            Bearer <token>``), a ``StaticToken`` or a ``RefreshingToken``.
        allow_insecure_token: send ``token`` over plaintext to non-loopback
            addresses (refused with a ConfigError otherwise).
        observers: :class:`~rpcframe.observe.CallObserver` objects told of
            every call and attempt (tracing, metrics); none costs nothing.
        connections_per_endpoint: connections (each its own grpc channel)
            opened to every resolved address; the policy picks among all of
            them per call. More than 1 reaches every process of a server
            run with ``--workers`` behind one address (the kernel spreads
            connections, not calls, over the processes): the extra ones
            show as ``address#2``, ``address#3``...
        compression: ``"gzip"`` or ``"deflate"`` to compress requests of
            ``compression_threshold`` bytes or more (``methods`` may say
            otherwise per method, a call's ``compression=`` always wins);
            ``None`` (default) sends everything uncompressed. Servers
            decompress either without configuration. Streamed requests are
            compressed whole-call (no size is known up front).
        compression_threshold: serialized unary request size, in bytes,
            below which requests go uncompressed: deflate makes small
            messages bigger and costs CPU for nothing (benchmarks/compression.py).
    """

    default_timeout: float | None = None
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    max_send_message_length: int = 4 * _MiB
    max_receive_message_length: int = 4 * _MiB
    keepalive_time: float | None = None
    keepalive_timeout: float = 20.0
    keepalive_permit_without_calls: bool = False
    user_agent: str = _USER_AGENT
    grpc_options: GrpcOptions = ()
    policy: str = "filtered_p2c"
    health_check: bool = True
    health_service: str = ""
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    throttle: ThrottleConfig | None = field(default_factory=ThrottleConfig)
    slow_start: float = 10.0
    panic_threshold: float = 0.5
    ewma_decay: float = 10.0
    dns_refresh: float = 30.0
    failover_attempts: int = 2
    close_grace: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retry_budget: BudgetConfig = field(default_factory=BudgetConfig)
    hedge: HedgePolicy | None = None
    methods: Mapping[str, MethodConfig] = field(default_factory=dict)
    deadline_margin: float = 0.005
    tls: TLSConfig | None = None
    token: str | TokenSource | None = None
    allow_insecure_token: bool = False
    observers: tuple[CallObserver, ...] = ()
    connections_per_endpoint: int = 1
    compression: str | None = None
    compression_threshold: int = 1024

    def __post_init__(self) -> None:
        _check_compression("compression", self.compression, self.compression_threshold)
        if not 1 <= self.connections_per_endpoint <= _MAX_CONNECTIONS:
            raise ConfigError(f"connections_per_endpoint must be within 1..{_MAX_CONNECTIONS}, "
                              f"got {self.connections_per_endpoint!r}")  # fmt: skip
        if self.deadline_margin < 0:
            raise ConfigError(f"deadline_margin must be >= 0, got {self.deadline_margin!r}")
        for key, value in self.methods.items():
            if not isinstance(value, MethodConfig) or not key or key.startswith("/") or key.count("/") > 1:
                raise ConfigError(f"methods[{key!r}] must map 'pkg.Service' or 'pkg.Service/Method' to a MethodConfig")
        if self.policy not in available_policies():
            raise ConfigError(f"policy {self.policy!r} is not one of {', '.join(available_policies())}")
        if self.slow_start < 0 or not 0 <= self.panic_threshold <= 1:
            raise ConfigError("slow_start must be >= 0 and panic_threshold within 0..1")
        if self.failover_attempts < 0:
            raise ConfigError(f"failover_attempts must be >= 0, got {self.failover_attempts!r}")
        _check_positive("ewma_decay", self.ewma_decay, allow_none=False)
        _check_positive("dns_refresh", self.dns_refresh, allow_none=False)
        _check_positive("default_timeout", self.default_timeout)
        _check_size("max_send_message_length", self.max_send_message_length)
        _check_size("max_receive_message_length", self.max_receive_message_length)
        _check_positive("keepalive_time", self.keepalive_time)
        _check_positive("keepalive_timeout", self.keepalive_timeout, allow_none=False)
        for key, _ in self.metadata:
            if key != key.lower() or key.startswith("grpc-"):
                raise ConfigError(f"metadata key {key!r} must be lower case and not start with 'grpc-'")

    def method_config(self, method: str) -> MethodConfig:
        """The effective policy of ``/pkg.Service/Method`` (defaults filled in)."""
        path = method.lstrip("/")
        service = path.split("/", 1)[0]
        specific = self.methods.get(path) or MethodConfig()
        general = self.methods.get(service) or MethodConfig()
        return MethodConfig(
            timeout=specific.timeout or general.timeout or self.default_timeout,
            retry=specific.retry or general.retry or self.retry,
            hedge=specific.hedge or general.hedge or self.hedge,
            criticality=specific.criticality or general.criticality,
            compression=specific.compression or general.compression or self.compression,
        )

    def channel_options(self) -> GrpcOptions:
        """The grpc channel arguments this config stands for (``grpc_options`` keys replace rpcframe's)."""
        return _override((
            ("grpc.max_send_message_length", self.max_send_message_length),
            ("grpc.max_receive_message_length", self.max_receive_message_length),
            ("grpc.primary_user_agent", self.user_agent),
            # Each endpoint channel owns its connection: with grpc's global
            # subchannel pool, a new channel to an address whose earlier
            # server died inherits that connection's reconnect backoff.
            ("grpc.use_local_subchannel_pool", 1),
            *_keepalive_options(self.keepalive_time, self.keepalive_timeout, self.keepalive_permit_without_calls),
        ), self.grpc_options)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How a server listens, limits and shuts down.

    The limits and timeouts below follow Envoy's edge-proxy best practices
    where a gRPC server can apply them (README, "Hardened defaults"): a
    client that stalls a stream or a connection is cut by a timeout, and one
    connection cannot take every handler thread.

    Attributes:
        max_workers: handler threads of the sync server (unused by asyncio).
            Threads start only when calls need them, so a large pool costs
            nothing while idle.
        max_concurrent_rpcs: calls accepted at once; more are refused with
            RESOURCE_EXHAUSTED. ``None`` means unlimited.
        max_concurrent_streams: calls one connection may have open at once
            (HTTP/2 ``SETTINGS_MAX_CONCURRENT_STREAMS``); the client holds
            further calls until one ends. ``None`` (default): 100 on the
            asyncio server (Envoy's edge value) and ``max_workers // 2`` on
            the thread-pool server, so one connection never holds more than
            half of the handler threads.
        stream_write_timeout: seconds a thread-pool streaming handler may
            wait for the client to take one response message (HTTP/2 flow
            control: the client is not reading). The call then ends with
            RESOURCE_EXHAUSTED and its thread is freed. ``None`` waits for
            ever. The asyncio server holds no thread while it waits.
        stream_read_timeout: seconds a thread-pool handler reading a
            request stream may wait for the client's next message; then the
            call ends with RESOURCE_EXHAUSTED (Envoy's ``stream_idle_timeout``,
            300 s, for the direction that holds a thread). ``None`` waits for
            ever.
        max_metadata_size: bytes of request headers (metadata) accepted per
            call; larger ones are refused with RESOURCE_EXHAUSTED. grpc's
            own limit is random between 8 and 16 KiB; this one is exact.
        max_connection_idle: seconds a connection with no call open stays
            up before the server closes it (GOAWAY); ``None`` keeps it.
        max_connection_age: seconds after which the server asks a client to
            reconnect (GOAWAY), e.g. to rebalance behind an L4 load
            balancer; ``None`` (default) never does.
        max_connection_age_grace: seconds calls still open on a connection
            that reached ``max_connection_age`` get before it is closed.
        handshake_timeout: seconds a new connection has to finish its TLS
            and HTTP/2 handshake before it is closed (grpc's default: 120).
        max_connections: connections accepted at once; further connection
            attempts are refused. ``None`` means unlimited.
        max_send_message_length: bytes; -1 for unlimited. Default 4 MiB.
        max_receive_message_length: bytes; -1 for unlimited. Default 4 MiB.
            A larger request is refused with RESOURCE_EXHAUSTED.
        keepalive_time: seconds between server keepalive pings; ``None`` off.
        keepalive_timeout: seconds to wait for a ping's answer.
        keepalive_min_client_interval: shortest ping interval accepted from
            clients, in seconds (grpc's default is 5 minutes; lower it when
            clients enable keepalive).
        reflection: serve grpc.reflection so tools (grpcurl, buf curl) can
            discover the contracts.
        health: serve grpc.health.v1 with a status per registered service.
        grace_period: seconds in-flight calls get to finish on ``stop()``
            before they are cancelled.
        drain_delay: seconds between reporting NOT_SERVING and refusing new
            calls on ``stop()``, so health-watching clients move away first.
            Clients here take 2-5 ms to stop picking a draining server
            (160 ms at worst in 40 runs under load, ``benchmarks/drain.py``); 0.25 s
            leaves room for a real network. Calls that still arrive are
            refused unrun and fail over, so 0 is safe for rpcframe clients.
        exception_status: Python exception types a handler may raise and the
            status each maps to (see :mod:`rpcframe.errors`).
        grpc_options: extra raw grpc server arguments; one with the key of
            an argument rpcframe sets replaces it.
        max_deadline: seconds a handler (and the calls it makes) may take at
            most, whatever deadline the caller sent, or none; ``None``
            (default) leaves the caller's deadline as it is. asyncio
            handlers are cancelled when it passes.
        tls: serve TLS on every ``bind()`` (:class:`~rpcframe.security.TLSConfig`;
            with a client CA, mTLS); certificate files reload when changed.
        auth: authenticate and authorize every call of added services
            (:class:`~rpcframe.security.AuthConfig`); ``None`` checks nothing.
        observers: :class:`~rpcframe.observe.CallObserver` objects told of
            every incoming call of added services; none costs nothing.
        overload: admission control (:class:`~rpcframe.OverloadConfig`):
            calls over an adaptive concurrency limit, behind a growing
            queue or unable to meet their deadline are refused at once,
            unrun, least critical first; ``None`` turns it off.
        rate_limits: token buckets per method and optionally per caller
            (:class:`~rpcframe.RateLimit`); a call over one is refused
            unrun with RESOURCE_EXHAUSTED and a retry hint.
        compression: ``"gzip"`` or ``"deflate"`` to compress responses to
            clients that accept it (every grpc client does); ``None``
            (default) sends them uncompressed. Requests of any supported
            algorithm are decompressed whatever this says.
        compression_threshold: serialized size, in bytes, below which a
            response message (unary or streamed) is sent
            uncompressed when ``compression`` is set.
    """

    max_workers: int = 64
    max_concurrent_rpcs: int | None = None
    max_concurrent_streams: int | None = None
    stream_write_timeout: float | None = 30.0
    stream_read_timeout: float | None = 300.0
    max_metadata_size: int = 16 * 1024
    max_connection_idle: float | None = 3600.0
    max_connection_age: float | None = None
    max_connection_age_grace: float = 300.0
    handshake_timeout: float = 10.0
    max_connections: int | None = None
    max_send_message_length: int = 4 * _MiB
    max_receive_message_length: int = 4 * _MiB
    keepalive_time: float | None = 7200.0
    keepalive_timeout: float = 20.0
    keepalive_min_client_interval: float = 300.0
    reflection: bool = True
    health: bool = True
    grace_period: float = 10.0
    drain_delay: float = 0.25
    exception_status: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = field(default=DEFAULT_EXCEPTION_STATUS)
    grpc_options: GrpcOptions = ()
    max_deadline: float | None = None
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None
    observers: tuple[CallObserver, ...] = ()
    overload: OverloadConfig | None = field(default_factory=OverloadConfig)
    rate_limits: tuple[RateLimit, ...] = ()
    compression: str | None = None
    compression_threshold: int = 1024

    def __post_init__(self) -> None:
        _check_compression("compression", self.compression, self.compression_threshold)
        _check_positive("max_deadline", self.max_deadline)
        if self.max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {self.max_workers!r}")
        for name in ("max_concurrent_rpcs", "max_concurrent_streams", "max_connections"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {value!r}")
        for name in ("stream_write_timeout", "stream_read_timeout", "max_connection_idle", "max_connection_age"):
            _check_positive(name, getattr(self, name))
        _check_positive("max_connection_age_grace", self.max_connection_age_grace, allow_none=False)
        _check_positive("handshake_timeout", self.handshake_timeout, allow_none=False)
        if self.max_metadata_size < 1024:
            raise ConfigError(f"max_metadata_size must be >= 1024 bytes, got {self.max_metadata_size!r}")
        _check_size("max_send_message_length", self.max_send_message_length)
        _check_size("max_receive_message_length", self.max_receive_message_length)
        _check_positive("keepalive_time", self.keepalive_time)
        _check_positive("keepalive_timeout", self.keepalive_timeout, allow_none=False)
        _check_positive("keepalive_min_client_interval", self.keepalive_min_client_interval, allow_none=False)
        if self.grace_period < 0:
            raise ConfigError(f"grace_period must be >= 0, got {self.grace_period!r}")
        if self.drain_delay < 0:
            raise ConfigError(f"drain_delay must be >= 0, got {self.drain_delay!r}")

    def concurrent_streams(self, *, threads: bool) -> int:
        """The per-connection stream limit in force (see ``max_concurrent_streams``)."""
        if self.max_concurrent_streams is not None:
            return self.max_concurrent_streams
        return max(1, self.max_workers // 2) if threads else _EDGE_STREAMS

    def server_options(self, *, threads: bool = False) -> GrpcOptions:
        """The grpc server arguments this config stands for (``threads``: for the thread-pool server).

        A key given in ``grpc_options`` replaces rpcframe's own entry: grpc
        keeps the first of two equal keys, so appending alone would not win.
        """
        own = (
            ("grpc.max_send_message_length", self.max_send_message_length),
            ("grpc.max_receive_message_length", self.max_receive_message_length),
            # Never share a port silently with another process.
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_min_client_interval * 1000)),
            *_keepalive_options(self.keepalive_time, self.keepalive_timeout, True),
            ("grpc.max_concurrent_streams", self.concurrent_streams(threads=threads)),
            # Off, grpc refuses (RST_STREAM REFUSED_STREAM, UNAVAILABLE to the
            # caller) calls of a client that keeps to the limit: it counts
            # streams until their memory is freed, not until they close.
            ("grpc.http.overload_protection", 0),
            # Soft and hard limit equal: grpc refuses at random between the two.
            ("grpc.max_metadata_size", self.max_metadata_size),
            ("grpc.absolute_max_metadata_size", self.max_metadata_size),
            *self._connection_options(),
            *self._compression_options(),
            *self._accept_queue_options(),
        )
        return _override(own, self.grpc_options)

    def _accept_queue_options(self) -> GrpcOptions:
        queue = None if self.overload is None else self.overload.accept_queue
        if queue is None:
            return ()
        # grpc refuses a new call with a probability rising from 0 at the
        # soft limit to 1 at the hard one (random early detection).
        return (("grpc.server.max_pending_requests", queue), ("grpc.server.max_pending_requests_hard_limit", 2 * queue))

    def _compression_options(self) -> GrpcOptions:
        # What grpc.server(compression=...) sets: the default algorithm of every response.
        algorithm = compression_of(self.compression)
        return () if algorithm is None else (("grpc.default_compression_algorithm", int(algorithm)),)

    def _connection_options(self) -> GrpcOptions:
        options: list[tuple[str, Any]] = [("grpc.server_handshake_timeout_ms", _ms(self.handshake_timeout))]
        if self.max_connection_idle is not None:
            options.append(("grpc.max_connection_idle_ms", _ms(self.max_connection_idle)))
        if self.max_connection_age is not None:
            options.append(("grpc.max_connection_age_ms", _ms(self.max_connection_age)))
            options.append(("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace)))
        if self.max_connections is not None:
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        return tuple(options)

    def status_for(self, exc: BaseException) -> grpc.StatusCode | None:
        """The status a handler exception maps to, or ``None`` if unmapped."""
        for exc_type, code in self.exception_status:
            if isinstance(exc, exc_type):
                return code
        return None
