"""rpcframe: typed gRPC services and clients with the policy grpcio leaves out.

The sync API lives here; the asyncio API with the same names in
:mod:`rpcframe.aio`.

Every name below is imported on first use (PEP 562), so ``import rpcframe``
loads nothing but this table: a program that never touches etcd or JWTs does
not pay for them, and the grpc-free core (``rpcframe._core``, config
validation) imports without grpc. After its first use a name is an ordinary
module attribute.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core.errors import ConfigError, RpcframeError
    from .balancing.endpoint import Endpoint
    from .balancing.outlier import OutlierConfig
    from .balancing.pickers import register_policy
    from .balancing.resolver import DNSResolver, ManualResolver, Resolver, StaticResolver, register_resolver
    from .client._sync import Channel, ResponseStream, connect
    from .config import (
        BudgetConfig,
        ChannelConfig,
        HedgePolicy,
        MethodConfig,
        OverloadConfig,
        RateLimit,
        RetryPolicy,
        ServerConfig,
        ThrottleConfig,
    )  # fmt: skip
    from .deadline import criticality, deadline_after, time_remaining
    from .discovery.etcd_registration import EtcdRegistration
    from .discovery.etcd_resolver import EtcdResolver
    from .errors import (
        Aborted,
        AlreadyExists,
        Cancelled,
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
        Unauthenticated,
        Unavailable,
        Unimplemented,
        Unknown,
    )
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
    from .server._workers import serve

    __version__: str

#: Defining module -> the public names it provides (what TYPE_CHECKING imports above).
_EXPORTS: dict[str, tuple[str, ...]] = {
    "._core.errors": ("ConfigError", "RpcframeError"),
    ".balancing.endpoint": ("Endpoint",),
    ".balancing.outlier": ("OutlierConfig",),
    ".balancing.pickers": ("register_policy",),
    ".balancing.resolver": ("DNSResolver", "ManualResolver", "Resolver", "StaticResolver", "register_resolver"),
    ".client._sync": ("Channel", "ResponseStream", "connect"),
    ".config": (
        "BudgetConfig", "ChannelConfig", "HedgePolicy", "MethodConfig", "OverloadConfig", "RateLimit", "RetryPolicy",
        "ServerConfig", "ThrottleConfig",
    ),  # fmt: skip
    ".deadline": ("criticality", "deadline_after", "time_remaining"),
    ".discovery.etcd_registration": ("EtcdRegistration",),
    ".discovery.etcd_resolver": ("EtcdResolver",),
    ".errors": (
        "Aborted", "AlreadyExists", "Cancelled", "DataLoss", "DeadlineExceeded", "FailedPrecondition", "Internal",
        "InvalidArgument", "NotFound", "OutOfRange", "PermissionDenied", "ResourceExhausted", "RpcError",
        "Unauthenticated", "Unavailable", "Unimplemented", "Unknown",
    ),  # fmt: skip
    ".security": (
        "ApiKeys", "AuthConfig", "Identity", "JWTConfig", "JWTKey", "Policy", "RefreshingToken", "Rule",
        "StaticToken", "TLSConfig", "peer",
    ),  # fmt: skip
    ".server._sync": ("Server",),
    ".server._workers": ("serve",),
}

_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

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
    "OverloadConfig",
    "PermissionDenied",
    "Policy",
    "RefreshingToken",
    "Resolver",
    "ResourceExhausted",
    "ResponseStream",
    "RateLimit",
    "RetryPolicy",
    "RpcError",
    "RpcframeError",
    "Rule",
    "Server",
    "ServerConfig",
    "StaticResolver",
    "ThrottleConfig",
    "StaticToken",
    "TLSConfig",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "connect",
    "criticality",
    "deadline_after",
    "peer",
    "register_policy",
    "register_resolver",
    "serve",
    "time_remaining",
    "__version__",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rpcframe")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use."""
    module = _MODULE_OF.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif name == "__version__":
        value = _version()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once: later reads are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
