"""Helpers shared by the subcommands."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


class CliError(Exception):
    """A user-facing failure: printed as one line, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1, *, prefix: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        # Compiler-style messages (file:line: text) are printed as they are.
        self.prefix = prefix


def load_object(spec: str) -> Any:
    """Import ``MODULE:ATTR`` (ATTR may be dotted), like uvicorn's app loading."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"{spec!r}: expected MODULE:OBJECT, e.g. examples.echo:servicer", 2)
    # Like `python -m`, resolve modules from the working directory first.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def split_host_port(address: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6) with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise CliError(f"{address!r}: expected HOST:PORT", 2)
    try:
        number = int(port)
    except ValueError:
        raise CliError(f"{address!r}: port must be a number", 2) from None
    if not 0 <= number <= 65535:
        raise CliError(f"{address!r}: port must be in 0..65535", 2)
    return host, number
