"""Compile a tree of ``.proto`` files into an importable Python package.

grpc's Python code generator writes absolute imports such as
``from acme.orders.v1 import orders_pb2``. Those only resolve when the output
directory itself is on ``sys.path``, and they collide with any installed
package of the same top-level name (``rpcframe.echo.v1`` would resolve to this
framework). :func:`generate` therefore rewrites every import of a module it
generated in the same run into a relative import (a file at the root of the
proto tree included), and drops an ``__init__.py`` into every output folder,
so the output directory is a self-contained package:
``import generated.rpcframe.echo.v1.echo_pb2_grpc`` works wherever
``generated`` itself can be imported. Imports of modules it did not generate
(google/protobuf well-known types, grpc) are left as they are. A ``.proto``
that defines no service gets no ``_pb2_grpc`` modules: they would be empty.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

__all__ = ["CodegenError", "GeneratedFile", "generate", "relativize_imports"]

_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi", "_events.py")
# `from a.b import c_pb2 as alias`; `import a.b.c_pb2` (older generators);
# `import c_pb2 as alias` (a file at the root of the proto tree, which has no package to import from).
_FROM_IMPORT = re.compile(r"^from ([\w.]+) import (\w+_pb2(?:_grpc)?)\b", re.MULTILINE)
_PLAIN_IMPORT = re.compile(r"^import ([\w.]+)\.(\w+_pb2(?:_grpc)?)$", re.MULTILINE)
_ROOT_IMPORT = re.compile(r"^import (\w+_pb2(?:_grpc)?)\b", re.MULTILINE)
_DESCRIPTORS = "descriptors.binpb"


class CodegenError(Exception):
    """protoc rejected the input; ``str()`` is protoc's ``file:line: message`` text."""


@dataclass(frozen=True)
class GeneratedFile:
    """One file written by :func:`generate`, relative to the output directory."""

    path: Path


def _well_known_include() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).parent / "_proto"


def _plugin(name: str) -> Path | None:
    """Find a protoc plugin installed next to this interpreter or on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def _protoc_args(proto_dir: Path, includes: Sequence[Path], out: Path) -> list[str]:
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}"]
    args += [f"-I{inc}" for inc in includes]
    args += [f"-I{_well_known_include()}", f"--python_out={out}", f"--grpc_python_out={out}"]
    mypy, mypy_grpc = _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc")
    if mypy and mypy_grpc:
        # mypy-protobuf types messages and stubs (sync and asyncio) precisely.
        args += [f"--plugin=protoc-gen-mypy={mypy}", f"--mypy_out={out}"]
        args += [f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}", f"--mypy_grpc_out={out}"]
    else:
        args.append(f"--pyi_out={out}")
    return args


def _run_protoc(
    proto_dir: Path, protos: Sequence[Path], includes: Sequence[Path], out: Path, descriptors: Path
) -> None:
    # protoc names a file in its messages by the path it was given, so the
    # inputs are passed as proto_dir/... : errors then point at files the way
    # the user reaches them from where they ran the command.
    # Source info: rpcframe.events reads `rpcframe:topic` comments; imports: the types they refer to.
    args = _protoc_args(proto_dir, includes, out) + [
        f"--descriptor_set_out={descriptors}", "--include_source_info", "--include_imports",
    ]  # fmt: skip
    proc = subprocess.run(args + [str(proto_dir / p) for p in protos], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Writing ")]
        raise CodegenError("\n".join(lines) or f"protoc failed with exit code {proc.returncode}")


def relativize_imports(source: str, module: str, generated: set[str]) -> str:
    """Rewrite imports of modules in ``generated`` to imports relative to ``module``.

    ``module`` and every name in ``generated`` are dotted names relative to the
    output package, e.g. ``rpcframe.echo.v1.echo_pb2``.
    """
    here = module.split(".")[:-1]

    def relative(package: str) -> str:
        target = package.split(".") if package else []
        common = 0
        while common < min(len(here), len(target)) and here[common] == target[common]:
            common += 1
        dots = "." * (len(here) - common + 1)
        return dots + ".".join(target[common:])

    def from_import(m: re.Match[str]) -> str:
        package, name = m.group(1), m.group(2)
        if f"{package}.{name}" not in generated:
            return m.group(0)
        return f"from {relative(package)} import {name}"

    def plain_import(m: re.Match[str]) -> str:
        package, name = m.group(1), m.group(2)
        if f"{package}.{name}" not in generated:
            return m.group(0)
        return f"from {relative(package)} import {name} as {package.replace('.', '_')}_{name}"

    def root_import(m: re.Match[str]) -> str:
        return f"from {relative('')} import {m.group(1)}" if m.group(1) in generated else m.group(0)

    source = _ROOT_IMPORT.sub(root_import, _FROM_IMPORT.sub(from_import, source))
    rewritten = _PLAIN_IMPORT.sub(plain_import, source)
    # Older generators refer to `a.b.c_pb2.Name`; point those at the new alias.
    for m in _PLAIN_IMPORT.finditer(source):
        package, name = m.group(1), m.group(2)
        if f"{package}.{name}" in generated:
            alias = f"{package.replace('.', '_')}_{name}"
            rewritten = re.sub(rf"(?<![\w.]){re.escape(package)}\.{name}\.", f"{alias}.", rewritten)
    return rewritten


def _module_name(path: Path) -> str:
    return ".".join(path.with_suffix("").parts)


def _drop_serviceless_grpc_modules(out: Path, descriptors: Path) -> None:
    """Remove the ``_pb2_grpc`` modules of files that define no service: they would be empty."""
    file_set = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes())
    for proto in file_set.file:
        if not proto.service:
            stem = proto.name.removesuffix(".proto")
            for suffix in ("_pb2_grpc.py", "_pb2_grpc.pyi"):
                (out / f"{stem}{suffix}").unlink(missing_ok=True)


def _postprocess(tmp: Path) -> list[Path]:
    files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.name.endswith(_GENERATED_SUFFIXES))
    modules = {_module_name(p) for p in files}
    for rel in files:
        path = tmp / rel
        path.write_text(relativize_imports(path.read_text(), _module_name(rel), modules))
    packages = {Path()} | {parent for rel in files for parent in rel.parents}
    for pkg in packages:
        init = tmp / pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
            files.append(pkg / "__init__.py")
    return sorted(files)


def find_protos(proto_dir: Path) -> list[Path]:
    """All ``.proto`` files under ``proto_dir``, sorted for stable output."""
    return sorted(proto_dir.rglob("*.proto"))


def generate(
    proto_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    includes: Iterable[str | os.PathLike[str]] = (),
    clean: bool = True,
) -> list[GeneratedFile]:
    """Compile every ``.proto`` under ``proto_dir`` into the package ``out_dir``.

    Files are generated into a temporary directory first, so a failed run
    leaves ``out_dir`` untouched. With ``clean`` (the default) stale generated
    files in ``out_dir`` are removed, so the output mirrors the proto tree.

    Raises:
        CodegenError: the protos do not compile (message in protoc's
            ``file:line:column: message`` form, the file named as
            ``proto_dir/...`` so the path works from where the caller is) or
            ``proto_dir`` holds none.
    """
    src, out = Path(proto_dir), Path(out_dir)
    if not src.is_dir():
        raise CodegenError(f"{src}: not a directory")
    protos = [p.relative_to(src) for p in find_protos(src)]
    if not protos:
        raise CodegenError(f"{src}: no .proto files found")
    with tempfile.TemporaryDirectory(prefix="rpcframe-codegen-") as tmp_name:
        tmp, descriptors = Path(tmp_name) / "out", Path(tmp_name) / _DESCRIPTORS
        tmp.mkdir()
        _run_protoc(src, protos, [Path(i) for i in includes], tmp, descriptors)
        _drop_serviceless_grpc_modules(tmp, descriptors)
        from .events._codegen import write_events_modules  # on use: rpcframe.events is optional

        write_events_modules(tmp, descriptors)  # <file>_events.py for files that declare topics
        files = _postprocess(tmp)
        if clean and out.exists():
            for stale in out.rglob("*"):
                if stale.is_file() and (stale.name.endswith(_GENERATED_SUFFIXES) or stale.name == "__init__.py"):
                    stale.unlink()
        for rel in files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp / rel, out / rel)
    return [GeneratedFile(rel) for rel in files]
