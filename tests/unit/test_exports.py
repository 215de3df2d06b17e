"""The curated public API stays as documented."""

from __future__ import annotations

import rpcframe
import rpcframe.aio
import rpcframe.security


def test_all_names_exist_and_are_documented() -> None:
    for module in (rpcframe, rpcframe.aio, rpcframe.security):
        for name in module.__all__:
            obj = getattr(module, name)
            if name != "__version__":
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"


def test_public_api() -> None:
    assert set(rpcframe.__all__) >= {
        "connect", "Channel", "Server", "ChannelConfig", "ServerConfig",
        "RpcError", "NotFound", "Unavailable", "DeadlineExceeded", "ConfigError",
    }  # fmt: skip
    assert set(rpcframe.__all__) >= {
        "TLSConfig", "AuthConfig", "JWTConfig", "JWTKey", "ApiKeys", "Policy", "Rule",
        "StaticToken", "RefreshingToken", "Identity", "peer",
    }  # fmt: skip
    assert set(rpcframe.__all__) >= {
        "RetryPolicy", "HedgePolicy", "BudgetConfig", "MethodConfig", "deadline_after", "time_remaining",
    }  # fmt: skip
    assert set(rpcframe.aio.__all__) == {"Call", "Channel", "Server", "connect"}
    assert not [n for n in rpcframe.__all__ if n.startswith("_") and n != "__version__"]
