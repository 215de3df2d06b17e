"""The curated public API stays as documented."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import rpcframe
import rpcframe.aio
import rpcframe.errors
import rpcframe.security
from rpcframe._core import errors as core_errors


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
    assert set(rpcframe.__all__) >= {
        "Resolver", "StaticResolver", "DNSResolver", "ManualResolver", "register_resolver", "register_policy",
        "EtcdResolver", "EtcdRegistration", "Endpoint", "OutlierConfig",
    }  # fmt: skip
    assert set(rpcframe.aio.__all__) == {"Call", "Channel", "Server", "connect"}
    assert not [n for n in rpcframe.__all__ if n.startswith("_") and n != "__version__"]


def _type_checking_imports() -> dict[str, str]:
    """name -> defining module, from the ``if TYPE_CHECKING:`` block of rpcframe/__init__.py."""
    tree = ast.parse(Path(rpcframe.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    return {
        alias.name: f"rpcframe.{node.module}"
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
    }


def test_lazy_names_are_the_objects_mypy_sees() -> None:
    # The table __getattr__ reads and the imports type checkers read must name the same objects.
    declared = _type_checking_imports()
    assert set(declared) == set(rpcframe.__all__) - {"__version__"}
    for name, module in declared.items():
        assert getattr(rpcframe, name) is getattr(importlib.import_module(module), name), name
    assert set(dir(rpcframe)) >= set(rpcframe.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        rpcframe.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_config_error_is_one_class() -> None:
    assert rpcframe.ConfigError is rpcframe.errors.ConfigError is core_errors.ConfigError
    assert rpcframe.RpcframeError is rpcframe.errors.RpcframeError is core_errors.RpcframeError
    assert issubclass(rpcframe.ConfigError, ValueError)
    assert issubclass(rpcframe.NotFound, rpcframe.RpcframeError)
    assert rpcframe.ConfigError.__module__ == "rpcframe.errors"  # tracebacks and pickles name the public module


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    root = Path(rpcframe.__file__).parent.parent
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )


HEAVY = ("grpc", "jwt", "cryptography", "rpcframe.discovery", "importlib.metadata")


def test_import_rpcframe_loads_no_heavy_module() -> None:
    result = _fresh(f"import sys, rpcframe; print([m for m in sys.modules if m.startswith({HEAVY!r})])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_call_api_loads_neither_jwt_nor_cryptography_nor_etcd() -> None:
    code = (
        "import sys, rpcframe\n"
        "rpcframe.connect, rpcframe.Server, rpcframe.ChannelConfig, rpcframe.ServerConfig, rpcframe.NotFound\n"
        "rpcframe.TLSConfig, rpcframe.AuthConfig, rpcframe.JWTConfig, rpcframe.ApiKeys\n"
        "print([m for m in sys.modules if m.startswith(('jwt', 'cryptography', 'rpcframe.discovery'))])\n"
    )
    result = _fresh(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
