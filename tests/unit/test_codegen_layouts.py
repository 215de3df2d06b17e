"""Codegen output imports as a package whatever the proto tree looks like; no empty grpc modules; error paths."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rpcframe.codegen import generate, relativize_imports


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def _python(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter with only ``cwd`` (the output's parent) to import from."""
    args = [sys.executable, "-c", textwrap.dedent(script)]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False, timeout=60)


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    """Root-level files, a nested folder, a package unlike its folder, imports in every direction."""
    root = tmp_path / "protos"
    _write(root, "common.proto", """
        syntax = "proto3";
        package common;
        message Money { int64 units = 1; }
    """)  # fmt: skip
    _write(root, "echo.proto", """
        syntax = "proto3";
        package echo;
        import "common.proto";
        import "deep/er/thing.proto";
        message Req { common.Money money = 1; other.pkg.Thing thing = 2; }
        service Echo { rpc Echo(Req) returns (Req); }
    """)  # fmt: skip
    _write(root, "deep/er/thing.proto", """
        syntax = "proto3";
        package other.pkg;  // not deep.er: the module path follows the file, not the package
        import "common.proto";
        message Thing { common.Money money = 1; }
        service Things { rpc Get(Thing) returns (Thing); }
    """)  # fmt: skip
    return root


def test_every_layout_imports_as_a_package(mixed_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "work" / "gen_pkg"
    generate(mixed_tree, out)
    result = _python("""
        from gen_pkg import common_pb2, echo_pb2, echo_pb2_grpc
        from gen_pkg.deep.er import thing_pb2, thing_pb2_grpc
        req = echo_pb2.Req(money=common_pb2.Money(units=3), thing=thing_pb2.Thing(money=common_pb2.Money(units=4)))
        assert echo_pb2.Req.FromString(req.SerializeToString()) == req
        assert echo_pb2_grpc.EchoStub and echo_pb2_grpc.add_EchoServicer_to_server
        assert thing_pb2_grpc.ThingsStub and thing_pb2.DESCRIPTOR.package == "other.pkg"
        import sys
        leaked = {"common_pb2", "echo_pb2", "deep"} & set(sys.modules)
        assert not leaked, leaked  # nothing imported as a top-level module
        print("ok")
    """, out.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_absolute_imports_of_generated_modules_remain(mixed_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    generate(mixed_tree, out)
    for path in out.rglob("*_pb2*.py*"):
        for line in path.read_text().splitlines():
            if "_pb2" in line and line.startswith(("import ", "from ")):
                assert line.startswith("from ."), f"{path.relative_to(out)}: {line}"
    assert "from . import echo_pb2 as echo__pb2" in (out / "echo_pb2_grpc.py").read_text()
    assert "from ... import common_pb2 as common__pb2" in (out / "deep/er/thing_pb2.py").read_text()


def test_relativize_root_level_imports() -> None:
    source = "import grpc\nimport echo_pb2 as echo__pb2\nimport other_pb2\nimport common_pb2\n"
    rewritten = relativize_imports(source, "a.b.x_pb2_grpc", {"echo_pb2", "common_pb2", "a.b.x_pb2"})
    assert rewritten.splitlines() == [
        "import grpc",
        "from ... import echo_pb2 as echo__pb2",
        "import other_pb2",
        "from ... import common_pb2",
    ]


def test_protos_without_services_get_no_grpc_modules(mixed_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    (out).mkdir()
    (out / "common_pb2_grpc.py").write_text("")  # left by an older codegen: cleaned away
    files = {str(f.path) for f in generate(mixed_tree, out)}
    for name in ("common_pb2_grpc.py", "common_pb2_grpc.pyi"):
        assert name not in files
        assert not (out / name).exists()
    assert {"common_pb2.py", "common_pb2.pyi", "echo_pb2_grpc.py", "echo_pb2_grpc.pyi",
            "deep/er/thing_pb2_grpc.py", "deep/er/thing_pb2_grpc.pyi"} <= files  # fmt: skip


@pytest.mark.parametrize(
    ("cwd", "proto_dir", "shown"),
    [
        (".", "protos", "protos/bad/v1/bad.proto:4:3:"),
        ("protos", ".", "bad/v1/bad.proto:4:3:"),
        ("elsewhere", "../protos", "../protos/bad/v1/bad.proto:4:3:"),
    ],
)
def test_cli_error_paths_are_relative_to_where_it_ran(tmp_path: Path, cwd: str, proto_dir: str, shown: str) -> None:
    bad = 'syntax = "proto3";\npackage bad.v1;\nmessage M {\n  strin name = 1;\n}\n'
    _write(tmp_path / "protos", "bad/v1/bad.proto", bad)
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "rpcframe", "codegen", proto_dir, "-o", str(tmp_path / "gen")],
        cwd=tmp_path / cwd, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f'{shown} "strin" is not defined.'
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "gen").exists()
