"""``rpcframe codegen PROTO_DIR -o OUT_DIR``."""

from __future__ import annotations

import argparse
import os
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
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"-o {args.out}: exists and is not a directory", 2)
    try:
        files = generate(args.proto_dir, args.out, includes=args.include)
    except CodegenError as exc:
        raise CliError(str(exc), prefix=False) from None
    except OSError as exc:  # e.g. a file where a package folder goes, or no permission
        raise CliError(f"cannot write {exc.filename or args.out}: {exc.strerror or exc}") from None
    if not args.quiet:
        print(f"generated {len(files)} files in {args.out}")
    return 0
