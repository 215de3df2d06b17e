"""``rpcframe codegen PROTO_DIR -o OUT_DIR``."""

from __future__ import annotations

import argparse
from typing import Any

from ..codegen import CodegenError, generate
from ._common import CliError


def register(sub: Any) -> None:
    """Add the subcommand to the parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "codegen", help="compile .proto files into an importable Python package"
    )
    p.add_argument("proto_dir", help="root of the .proto tree (import paths are relative to it)")
    p.add_argument("-o", "--out", required=True, help="output package directory, e.g. generated")
    p.add_argument("-I", "--include", action="append", default=[], help="extra import path (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Generate code; protoc errors are printed as ``file:line: message``."""
    try:
        files = generate(args.proto_dir, args.out, includes=args.include)
    except CodegenError as exc:
        raise CliError(str(exc), prefix=False) from None
    if not args.quiet:
        print(f"generated {len(files)} files in {args.out}")
    return 0
