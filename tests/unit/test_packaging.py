"""The wheel ships the ``rpcframe`` package only: no top-level ``generated`` to shadow users' own codegen output."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_rpcframe_and_its_type_marker_only(tmp_path: Path) -> None:
    # A copy, so an old build/ directory of the checkout cannot leak into the wheel.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("rpcframe", "generated"):  # generated/ is there, as in a checkout, and must stay out
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    built = subprocess.run([*pip, "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("rpcframe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("rpcframe-")} == {"rpcframe"}
    assert "rpcframe/py.typed" in names
    assert "rpcframe/cli/__init__.py" in names
