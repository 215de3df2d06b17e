"""The ``rpcframe`` command: codegen, serve, call, health, bench.

Every subcommand reports bad input as one ``rpcframe: error: ...`` line on
stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _bench, _call, _codegen, _health, _serve
from ._common import CliError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="rpcframe", description="gRPC services with rpcframe")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (_codegen, _serve, _call, _health, _bench):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rpcframe`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"rpcframe: error: {exc}" if exc.prefix else str(exc), file=sys.stderr)
        return exc.exit_code
