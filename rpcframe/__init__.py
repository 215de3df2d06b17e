"""rpcframe: typed gRPC services and clients with the policy grpcio leaves out.

The sync API lives here; the asyncio API with the same names in
:mod:`rpcframe.aio`.
"""

from importlib.metadata import PackageNotFoundError, version

from .balancing.endpoint import Endpoint
from .balancing.pickers import register_policy
from .balancing.resolver import DNSResolver, ManualResolver, Resolver, StaticResolver
from .client._sync import Channel, ResponseStream, connect
from .config import ChannelConfig, ServerConfig
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
from .server._sync import Server

try:
    __version__ = version("rpcframe")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "Channel",
    "ChannelConfig",
    "ConfigError",
    "DNSResolver",
    "DataLoss",
    "DeadlineExceeded",
    "Endpoint",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "ManualResolver",
    "NotFound",
    "OutOfRange",
    "OutlierConfig",
    "PermissionDenied",
    "Resolver",
    "ResourceExhausted",
    "ResponseStream",
    "RpcError",
    "RpcframeError",
    "Server",
    "ServerConfig",
    "StaticResolver",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "__version__",
    "connect",
    "register_policy",
]
