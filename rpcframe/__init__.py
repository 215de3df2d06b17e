"""rpcframe: typed gRPC services and clients with the policy grpcio leaves out.

The sync API lives here; the asyncio API with the same names in
:mod:`rpcframe.aio`.
"""

from importlib.metadata import PackageNotFoundError, version

from .balancing.endpoint import Endpoint
from .balancing.etcd import EtcdRegistration, EtcdResolver
from .balancing.pickers import register_policy
from .balancing.resolver import DNSResolver, ManualResolver, Resolver, StaticResolver
from .client._sync import Channel, ResponseStream, connect
from .config import BudgetConfig, ChannelConfig, HedgePolicy, MethodConfig, RetryPolicy, ServerConfig
from .deadline import deadline_after, time_remaining
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ConfigError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    RpcframeError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from .health.outlier import OutlierConfig
from .security import (
    ApiKeys,
    AuthConfig,
    Identity,
    JWTConfig,
    JWTKey,
    Policy,
    RefreshingToken,
    Rule,
    StaticToken,
    TLSConfig,
    peer,
)
from .server._sync import Server

try:
    __version__ = version("rpcframe")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ApiKeys",
    "AuthConfig",
    "BudgetConfig",
    "Cancelled",
    "Channel",
    "ChannelConfig",
    "ConfigError",
    "DNSResolver",
    "DataLoss",
    "DeadlineExceeded",
    "Endpoint",
    "EtcdRegistration",
    "EtcdResolver",
    "FailedPrecondition",
    "HedgePolicy",
    "Identity",
    "Internal",
    "InvalidArgument",
    "JWTConfig",
    "JWTKey",
    "ManualResolver",
    "MethodConfig",
    "NotFound",
    "OutOfRange",
    "OutlierConfig",
    "PermissionDenied",
    "Policy",
    "RefreshingToken",
    "Resolver",
    "ResourceExhausted",
    "ResponseStream",
    "RetryPolicy",
    "RpcError",
    "RpcframeError",
    "Rule",
    "Server",
    "ServerConfig",
    "StaticResolver",
    "StaticToken",
    "TLSConfig",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "connect",
    "deadline_after",
    "peer",
    "register_policy",
    "time_remaining",
    "__version__",
]
