"""The rpcframe command line against real server processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.cli import REPO, ServeProcess, run_cli


@pytest.fixture(params=["examples.echo:servicer", "examples.echo:aio_servicer"], ids=["sync", "aio"])
def served(request: pytest.FixtureRequest) -> Iterator[ServeProcess]:
    server = ServeProcess(request.param, "--bind", "127.0.0.1:0", "--grace", "5")
    yield server
    server.kill()


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
    assert "Traceback" not in served.kill()


def test_health_command(served: ServeProcess) -> None:
    ok = run_cli("health", served.target)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    svc = run_cli("health", served.target, "--service", "rpcframe.echo.v1.EchoService")
    assert (svc.returncode, svc.stdout.strip()) == (0, "SERVING")
    unknown = run_cli("health", served.target, "--service", "nope.Service")
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
        (["serve", "examples.echo:servicer", "--rate-limit", "x"], "expected METHOD=RATE[/BURST][:per-caller]", 2),
        (["serve", "examples.echo:servicer", "--rate-limit", "*=fast"], "RATE and BURST must be numbers", 2),
        (["serve", "examples.echo:servicer", "--rate-limit", "*=0"], "rate must be > 0", 2),
        (["serve", "examples.echo:servicer", "--rate-limit", "/a/b=1"], "method must be", 2),
    ],
)
def test_serve_bad_input(args: list[str], message: str, code: int) -> None:
    result = run_cli(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_port_in_use() -> None:
    first = ServeProcess("examples.echo:servicer", "--bind", "127.0.0.1:0")
    try:
        result = run_cli("serve", "examples.echo:servicer", "--bind", first.target)
        assert result.returncode == 1
        assert f"cannot bind {first.target}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        first.kill()


def test_health_unreachable() -> None:
    result = run_cli("health", "127.0.0.1:1", "--timeout", "0.5")
    assert result.returncode == 2  # grpc-health-probe's connection failure
    assert "Traceback" not in result.stderr


def test_module_entry_point_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("codegen", "serve", "health"):
        assert command in result.stdout
    assert os.path.exists(REPO / "examples" / "echo.py")
