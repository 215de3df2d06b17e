"""The root of rpcframe's error tree, defined without grpc.

:mod:`rpcframe.errors` re-exports both classes (they are the same objects),
so ``except rpcframe.ConfigError`` catches what the pure core raises. They
live here so that ``_core`` (and anything else that only validates settings)
imports without loading grpc.
"""

from __future__ import annotations

__all__ = ["ConfigError", "RpcframeError"]


class RpcframeError(Exception):
    """Base of every exception rpcframe raises."""

    # Shown (tracebacks, repr of the class) and pickled under the public module.
    __module__ = "rpcframe.errors"


class ConfigError(RpcframeError, ValueError):
    """A configuration value is invalid; the message names the field."""

    __module__ = "rpcframe.errors"
