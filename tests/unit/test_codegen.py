"""Codegen on user proto trees: cross-file imports, well-known types, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rpcframe.cli import main
from rpcframe.codegen import CodegenError, generate, relativize_imports


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def proto_tree(tmp_path: Path) -> Path:
    """A user's tree: two packages, one importing the other and well-known types."""
    root = tmp_path / "protos"
    _write(root, "acme/common/v1/money.proto", """
        syntax = "proto3";
        package acme.common.v1;
        message Money { string currency = 1; int64 units = 2; }
    """)  # fmt: skip
    _write(root, "acme/orders/v1/orders.proto", """
        syntax = "proto3";
        package acme.orders.v1;
        import "acme/common/v1/money.proto";
        import "google/protobuf/timestamp.proto";
        import "google/protobuf/empty.proto";
        message Order { string id = 1; acme.common.v1.Money total = 2; google.protobuf.Timestamp placed = 3; }
        service Orders {
          rpc Get(Order) returns (Order) { option idempotency_level = NO_SIDE_EFFECTS; }
          rpc Ping(google.protobuf.Empty) returns (google.protobuf.Empty);
        }
    """)  # fmt: skip
    return root


def test_generates_importable_package(proto_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "work" / "gen_pkg"
    files = {str(f.path) for f in generate(proto_tree, out)}
    assert {"__init__.py", "acme/orders/v1/orders_pb2.py", "acme/orders/v1/orders_pb2_grpc.py",
            "acme/orders/v1/orders_pb2.pyi", "acme/common/v1/money_pb2.py"} <= files  # fmt: skip
    # A fresh interpreter with only the output's parent on sys.path (as when
    # the package is installed), to prove no sys.path tricks are needed.
    script = textwrap.dedent("""
        import gen_pkg.acme.orders.v1.orders_pb2_grpc as g
        from gen_pkg.acme.orders.v1 import orders_pb2
        from gen_pkg.acme.common.v1 import money_pb2
        order = orders_pb2.Order(id="7", total=money_pb2.Money(currency="EUR", units=3))
        order.placed.FromSeconds(10)
        assert orders_pb2.Order.FromString(order.SerializeToString()) == order
        assert hasattr(g, "OrdersStub") and hasattr(g, "add_OrdersServicer_to_server")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=out.parent, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_imports_are_relative_and_wkt_untouched(proto_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    generate(proto_tree, out)
    pb2 = (out / "acme/orders/v1/orders_pb2.py").read_text()
    assert "from ...common.v1 import money_pb2" in pb2
    assert "from google.protobuf import timestamp_pb2" in pb2
    grpc_mod = (out / "acme/orders/v1/orders_pb2_grpc.py").read_text()
    assert "from . import orders_pb2" in grpc_mod
    assert "from acme" not in grpc_mod + pb2
    stub_types = (out / "acme/orders/v1/orders_pb2_grpc.pyi").read_text()
    assert "from acme" not in stub_types


def test_stale_files_are_removed(proto_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    generate(proto_tree, out)
    (proto_tree / "acme/common/v1/money.proto").unlink()
    text = (proto_tree / "acme/orders/v1/orders.proto").read_text()
    (proto_tree / "acme/orders/v1/orders.proto").write_text(
        text.replace('import "acme/common/v1/money.proto";', "").replace("acme.common.v1.Money total = 2;", "")
    )
    generate(proto_tree, out)
    assert not (out / "acme/common/v1/money_pb2.py").exists()
    assert (out / "acme/orders/v1/orders_pb2.py").exists()


def test_broken_proto_reports_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "protos"
    _write(root, "bad/v1/bad.proto", 'syntax = "proto3";\npackage bad.v1;\nmessage M {\n  strin name = 1;\n}\n')
    out = tmp_path / "gen"
    with pytest.raises(CodegenError) as info:
        generate(root, out)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{root}/bad/v1/bad.proto:4:")  # the proto dir as given (here absolute)
    assert "strin" in str(info.value)
    assert not out.exists()  # nothing half-written


def test_cli_broken_proto_exit_code_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "protos"
    _write(root, "x.proto", 'syntax = "proto3";\nimport "missing.proto";\n')
    code = main(["codegen", str(root), "-o", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert code == 1
    assert 'x.proto:2:1: Import "missing.proto" was not found' in err
    assert "Traceback" not in err


def test_cli_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["codegen", str(tmp_path / "nope"), "-o", str(tmp_path / "gen")])
    assert code == 1
    assert "not a directory" in capsys.readouterr().err


def test_relativize_rewrites_only_generated_modules() -> None:
    source = textwrap.dedent("""
        from a.b import x_pb2 as a_dot_b_dot_x__pb2
        from google.protobuf import any_pb2 as google_dot_protobuf_dot_any__pb2
        import a.c.y_pb2
        z = a.c.y_pb2.Thing
    """)
    generated = {"a.b.x_pb2", "a.c.y_pb2", "a.b.w_pb2"}
    out = relativize_imports(source, "a.b.w_pb2", generated)
    assert "from . import x_pb2 as a_dot_b_dot_x__pb2" in out
    assert "from google.protobuf import any_pb2" in out
    assert "from ..c import y_pb2 as a_c_y_pb2" in out
    assert "z = a_c_y_pb2.Thing" in out


def test_committed_generated_code_matches_protos(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "generated"
    generate(repo / "protos", out)
    for path in out.rglob("*"):
        if path.is_file():
            committed = repo / "generated" / path.relative_to(out)
            assert committed.exists(), f"{committed} missing: run make protos"
            assert committed.read_text() == path.read_text(), f"{committed} is stale: run make protos"
