"""Bad input to ``rpcframe bench``: one ``rpcframe: error:`` line, non-zero exit, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rpcframe.cli import _bench

from .conftest import Served

REPO = Path(__file__).resolve().parents[2]
UNARY = "rpcframe.bench.v1.BenchService/Unary"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_one_error_line(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rpcframe: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--method", UNARY, "--data", "{not json"], ["--data", "JSON"]),
        (["--method", UNARY, "--data", '{"noSuchField": 1}'], ["noSuchField"]),
        (["--method", "rpcframe.bench.v1.BenchService/Nope"], ["no method 'Nope'", "Unary"]),
        (["--method", "JustAName"], ["expected package.Service/Method"]),
        (["--method", UNARY, "--proto-module", "no.such.module"], ["cannot import"]),
        (["--method", "rpcframe.bench.v1.BenchService/Record", "--payload-size", "8"], ["bytes payload"]),
        (["--method", "rpcframe.bench.v1.BenchService/PingPong", "--rps", "10"], ["open loop"]),
    ],
    ids=["bad-json", "unknown-field", "unknown-method", "bad-method-name", "bad-proto-module", "no-payload",
         "bidi-open-loop"],
)  # fmt: skip
def test_input_errors(rpcframe_server: Served, capsys: pytest.CaptureFixture[str], args: list[str],
                      fragments: list[str]) -> None:  # fmt: skip
    assert _bench.main([rpcframe_server.target, "-n", "5", "--no-progress", *args]) != 0
    captured = capsys.readouterr()
    _assert_one_error_line(captured.err, *fragments)
    assert rpcframe_server.servicer.counts == {}  # nothing was sent


def test_unknown_service_on_a_raw_server(raw_server: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench.main([raw_server.target, "--method", "acme.v1.Nothing/Call", "-n", "5"]) != 0
    _assert_one_error_line(
        capsys.readouterr().err, "does not serve 'acme.v1.Nothing'", "rpcframe.bench.v1.BenchService"
    )


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_unreachable_target(capsys: pytest.CaptureFixture[str], mode: str) -> None:
    target = f"127.0.0.1:{_closed_port()}"
    code = _bench.main([target, "--method", UNARY, "-n", "5", "--mode", mode, "--loop", "asyncio",
                        "--connect-timeout", "300ms"])  # fmt: skip
    assert code != 0
    _assert_one_error_line(capsys.readouterr().err, f"cannot connect to {target}")


def test_unwritable_output_fails_before_the_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _bench.main(["127.0.0.1:9", "--method", UNARY, "--json", str(blocker / "out.json")]) != 0
    _assert_one_error_line(capsys.readouterr().err, "--json")


def test_command_line_process_reports_without_traceback() -> None:
    """The same through a real process: exit code and stderr as a user sees them."""
    target = f"127.0.0.1:{_closed_port()}"
    for args in (["--data", "[1, 2"], ["--connect-timeout", "300ms"]):
        command = [sys.executable, "-m", "rpcframe", "bench", target, "--method", UNARY, "-n", "5", *args]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1
        _assert_one_error_line(proc.stderr)
        assert proc.stdout == ""
