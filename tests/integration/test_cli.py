"""The rpcframe command line against real server processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    """`rpcframe serve` in a child process, stopped by PID."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rpcframe", "serve", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.target = self._read_ready_line()

    def _read_ready_line(self) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(30)
        if not lines or not lines[0]:
            pytest.fail(f"server did not become ready: {self.stop()}")
        match = re.fullmatch(r"serving on (\S+:\d+)\n", lines[0])
        assert match, lines[0]
        return match.group(1)

    def stop(self) -> str:
        """Kill the process if it still runs; return what it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        return err


@pytest.fixture(params=["examples.echo:servicer", "examples.echo:aio_servicer"], ids=["sync", "aio"])
def served(request: pytest.FixtureRequest) -> Iterator[ServeProcess]:
    server = ServeProcess(request.param, "--bind", "127.0.0.1:0", "--grace", "5")
    yield server
    server.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rpcframe", *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_serve_answers_and_drains_on_sigterm(served: ServeProcess) -> None:
    with rpcframe.connect(served.target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(pb.EchoRequest(message="cli")).message == "cli"
        assert [r.index for r in stub.Expand(pb.ExpandRequest(message="m", count=3))] == [0, 1, 2]
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        served.proc.send_signal(signal.SIGTERM)
        # The watcher sees NOT_SERVING before the stream ends.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert served.proc.wait(15) == 0
    assert "Traceback" not in served.stop()


def test_health_command(served: ServeProcess) -> None:
    ok = _cli("health", served.target)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    svc = _cli("health", served.target, "--service", "rpcframe.echo.v1.EchoService")
    assert (svc.returncode, svc.stdout.strip()) == (0, "SERVING")
    unknown = _cli("health", served.target, "--service", "nope.Service")
    assert unknown.returncode == 3
    assert "unknown to the server" in unknown.stderr
    assert "Traceback" not in unknown.stderr


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["serve", "examples.echo"], "expected MODULE:OBJECT", 2),
        (["serve", "no_such_module:x"], "cannot import module 'no_such_module'", 1),
        (["serve", "examples.echo:nothing"], "has no attribute 'nothing'", 1),
        (["serve", "examples.echo:pb2_missing", "--bind", "x"], "has no attribute", 1),
        (["serve", "examples.echo:servicer", "--bind", "localhost"], "expected HOST:PORT", 2),
        (["serve", "examples.echo:servicer", "--bind", "127.0.0.1:99999"], "port must be in 0..65535", 2),
        (["serve", "examples.echo:_echo_metadata_sync"], "cannot create servicers: TypeError", 1),
        (["serve", "examples.echo:__doc__"], "must be a servicer", 2),
    ],
)
def test_serve_bad_input(args: list[str], message: str, code: int) -> None:
    result = _cli(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_port_in_use() -> None:
    first = ServeProcess("examples.echo:servicer", "--bind", "127.0.0.1:0")
    try:
        result = _cli("serve", "examples.echo:servicer", "--bind", first.target)
        assert result.returncode == 1
        assert f"cannot bind {first.target}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        first.stop()


def test_health_unreachable() -> None:
    result = _cli("health", "127.0.0.1:1", "--timeout", "0.5")
    assert result.returncode == 4
    assert "Traceback" not in result.stderr


def test_module_entry_point_help() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("codegen", "serve", "health"):
        assert command in result.stdout
    assert os.path.exists(REPO / "examples" / "echo.py")
