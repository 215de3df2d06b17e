"""The ``rpcframe`` command: codegen, serve, call, health, bench, publish, consume.

Every subcommand reports bad input as one ``rpcframe: error: ...`` line on
stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

# grpc C-core reads GRPC_VERBOSITY when it starts: its log lines (add_port.cc, chttp2_transport.cc ...)
# repeat what the CLI says in its own words, so they are off unless the user asks for them.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from . import _bench, _call, _codegen, _events, _health, _serve  # noqa: E402 - after the environment above
from ._common import CliError  # noqa: E402

__all__ = ["main"]


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: flags anywhere among the positionals, and its own usage on errors.

    ``usage_exit_code`` is the exit code of a usage error (argparse's 2 unless
    the subcommand follows another tool's codes, as ``health`` does).
    """

    _nested = False

    def __init__(self, *args: Any, usage_exit_code: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_exit_code = usage_exit_code

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Intermixed parsing; arguments left over are this subcommand's error, not the top level's."""
        if self._nested:  # parse_known_intermixed_args calls back here, twice
            return super().parse_known_args(args, namespace)
        self._nested = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._nested = False
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        """Usage and the message on stderr, exit ``usage_exit_code``."""
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit_code, f"{self.prog}: error: {message}\n")


def _version() -> str:
    from .. import __version__

    return f"rpcframe {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="rpcframe", description="gRPC services with rpcframe")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_SubcommandParser)
    for module in (_codegen, _serve, _call, _health, _bench, _events):
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
