"""The refusal benchmark's model and a one-round run against real servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import refusal


def test_ceiling_model() -> None:
    assert refusal.ceiling(1, 2000, 200) == pytest.approx(1.0)  # no excess: everything fits
    assert refusal.ceiling(5, 2000, 0) == pytest.approx(1.0)  # free refusals keep all of capacity
    # 3x with refusals at a tenth of a call: (1 - 0.3) / (1 - 0.1)
    assert refusal.ceiling(3, 2000, 200) == pytest.approx(0.7 / 0.9)
    assert refusal.ceiling(5, 2000, 200) < refusal.ceiling(3, 2000, 200)
    assert refusal.ceiling(20, 2000, 200) == 0.0  # refusing alone takes the whole CPU


@pytest.mark.slow
def test_one_round_measures_every_mode(tmp_path: Path) -> None:
    assert refusal.main(["--rounds", "1", "--calls", "300", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "refusal.md").read_text(encoding="utf-8")
    for mode in refusal.MODES:
        assert f"| {mode} |" in report
    assert "{'RESOURCE_EXHAUSTED': 300}" in report  # rpcframe refused every call, unrun
    assert "'CANCELLED'" in report  # grpc's core refused calls itself
