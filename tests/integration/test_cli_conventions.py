"""Command-line conventions of every subcommand (issue 16, "CLI"): real ``rpcframe`` subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rpcframe
from tests.cli import REPO, ServeProcess, assert_cli_error, run_cli
from tests.conftest import wait_until

ECHO = "rpcframe.echo.v1.EchoService/Echo"


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"rpcframe {rpcframe.__version__}\n", "")


@pytest.fixture(scope="module")
def served() -> Iterator[ServeProcess]:
    server = ServeProcess("examples.echo:servicer", "--bind", "127.0.0.1:0")
    yield server
    server.kill()


def test_flags_between_positionals(served: ServeProcess) -> None:
    result = run_cli("call", served.target, "-d", '{"message": "hi"}', "--timeout", "5", ECHO)
    assert (result.returncode, result.stdout.strip()) == (0, '{"message": "hi"}'), result.stderr
    health = run_cli("health", "--timeout", "5", served.target)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (("call", "127.0.0.1:1", "--bogus", ECHO), "call"),
        (("health", "127.0.0.1:1", "--bogus"), "health"),
        (("serve", "examples.echo:servicer", "--bogus"), "serve"),
        (("codegen", "protos", "-o", "out", "--bogus"), "codegen"),
        (("bench", "127.0.0.1:1", "--method", ECHO, "--bogus"), "bench"),
        (("call", "127.0.0.1:1", ECHO, "extra"), "call"),
    ],
)
def test_usage_errors_show_the_subcommands_usage(args: tuple[str, ...], command: str) -> None:
    result = run_cli(*args)
    assert result.returncode == (1 if command == "health" else 2), result.stderr  # health: grpc-health-probe's 1
    assert result.stderr.startswith(f"usage: rpcframe {command} "), result.stderr
    assert re.search(rf"^rpcframe {command}: error: unrecognized arguments: ", result.stderr, re.M), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("127.0.0.1:notaport", "'127.0.0.1:notaport': port must be a number"),
        ("127.0.0.1", "'127.0.0.1': expected HOST:PORT"),
        ("127.0.0.1:1,127.0.0.1", "'127.0.0.1': expected HOST:PORT"),
        ("127.0.0.1:70000", "port must be in 0..65535"),
    ],
)
@pytest.mark.parametrize("command", ["call", "health"])
def test_bad_target_is_refused_at_once(command: str, target: str, message: str) -> None:
    args = (command, target, ECHO) if command == "call" else (command, target)
    start = time.monotonic()
    result = run_cli(*args, "--timeout", "30")
    assert time.monotonic() - start < 15  # not the 30 s timeout
    assert_cli_error(result, 1 if command == "health" else 2, message)  # health: grpc-health-probe's 1


# --- health as grpc-health-probe ---------------------------------------------------------------------


def test_health_probe_spellings_and_codes(served: ServeProcess) -> None:
    ok = run_cli("health", f"-addr={served.target}", "-connect-timeout", "5s", "-rpc-timeout", "5s")
    assert (ok.returncode, ok.stdout) == (0, "SERVING\n"), ok.stderr
    svc = run_cli("health", "-addr", served.target, "-service", "rpcframe.echo.v1.EchoService")
    assert (svc.returncode, svc.stdout) == (0, "SERVING\n"), svc.stderr
    assert_cli_error(run_cli("health", "-addr", served.target, "-service", "nope.Service"), 3, "unknown to the server")
    assert_cli_error(run_cli("health", "-addr", served.target, "-tls-ca-cert", "/nonexistent.pem"), 1, "--tls-ca")
    assert_cli_error(run_cli("health"), 1, "give the server as TARGET or -addr HOST:PORT")
    bad = run_cli("health", served.target, "-rpc-timeout", "soon")
    assert bad.returncode == 1
    assert "'soon' is not a duration" in bad.stderr


def test_health_connection_failure_within_connect_timeout() -> None:
    start = time.monotonic()
    result = run_cli("health", "-addr", "127.0.0.1:1", "-connect-timeout", "300ms", "-rpc-timeout", "30s")
    assert time.monotonic() - start < 15  # the connect timeout, not the RPC one
    assert_cli_error(result, 2, "127.0.0.1:1: no connection within 0.3s")


def test_health_not_serving_is_4() -> None:
    server = ServeProcess("examples.echo:servicer", "--bind", "127.0.0.1:0", "--drain-delay", "20", "--grace", "1")
    try:
        server.proc.send_signal(signal.SIGTERM)  # NOT_SERVING for --drain-delay, then it stops
        results: list[subprocess.CompletedProcess[str]] = []
        wait_until(lambda: results.append(run_cli("health", "-addr", server.target)) or results[-1].returncode != 0,
                   timeout=15, interval=0.05)  # fmt: skip
        assert (results[-1].returncode, results[-1].stdout) == (4, "NOT_SERVING\n"), results[-1].stderr
    finally:
        server.kill()


# --- user errors are one line, not a traceback -----------------------------------------------------------


def test_serve_module_with_a_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "issue16_broken.py").write_text("servicer = (\n\ndef f(:\n    pass\n")
    result = run_cli("serve", "issue16_broken:servicer", "--bind", "127.0.0.1:0", env={"PYTHONPATH": str(tmp_path)})
    assert_cli_error(result, 1, "cannot import module 'issue16_broken': ")
    assert f"({tmp_path / 'issue16_broken.py'}, line " in result.stderr


def test_serve_unknown_log_level() -> None:
    result = run_cli("serve", "examples.echo:servicer", "--bind", "127.0.0.1:0", "--log-level", "LOUD")
    assert_cli_error(result, 2, "--log-level 'LOUD': expected DEBUG, INFO, WARNING, ERROR or CRITICAL")


def test_codegen_into_an_existing_file(tmp_path: Path) -> None:
    existing = tmp_path / "out.txt"
    existing.write_text("keep me")
    result = run_cli("codegen", "protos", "-o", str(existing))
    assert_cli_error(result, 2, f"-o {existing}: exists and is not a directory")
    assert existing.read_text() == "keep me"


def _serve_without_grpc_verbosity(*args: str, verbosity: str | None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"}
    if verbosity is not None:
        env["GRPC_VERBOSITY"] = verbosity
    return subprocess.run(
        [sys.executable, "-m", "rpcframe", "serve", *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["--sync", "--aio"])
def test_serve_port_in_use_says_so(served: ServeProcess, mode: str) -> None:
    result = _serve_without_grpc_verbosity("examples.echo:servicer", "--bind", served.target, mode, verbosity=None)
    assert_cli_error(result, 1, f"cannot bind {served.target}: address already in use")
    # grpc C-core's own lines (E... add_port.cc) are quiet by default...
    assert result.stderr.splitlines() == [f"rpcframe: error: cannot bind {served.target}: address already in use"]
    # ...and there when GRPC_VERBOSITY asks for them.
    loud = _serve_without_grpc_verbosity("examples.echo:servicer", "--bind", served.target, mode, verbosity="ERROR")
    assert loud.returncode == 1
    assert "add_port.cc" in loud.stderr


def test_bench_takes_ghz_spellings(served: ServeProcess, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    data = '{"message": "hello"}'
    result = run_cli("bench", "-d", data, served.target, "--call", ECHO, "-n", "10", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["summary"]["ok"] == 10
    assert report["config"]["method"] == f"/{ECHO}"
    assert report["config"]["request_bytes"] == 7  # field tag, length, "hello": -d was the request
    assert f"wrote {out}" in result.stdout.splitlines()


def test_bench_where_every_call_fails_exits_1(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("someone:a-key-bench-does-not-send\n")
    server = ServeProcess("examples.echo:servicer", "--bind", "127.0.0.1:0", "--api-key-file", str(keys))
    try:
        result = run_cli("bench", server.target, "--call", ECHO, "-n", "5")
        assert result.returncode == 1, result.stderr
        assert "UNAUTHENTICATED" in result.stdout  # the summary's status line
        errors = [line for line in result.stderr.splitlines() if line.startswith("rpcframe: error: ")]
        assert errors == ["rpcframe: error: every call failed (5 calls, none OK)"], result.stderr
    finally:
        server.kill()


@pytest.mark.slow
def test_bench_progress_lines_off_a_terminal_and_the_n_z_warning(served: ServeProcess) -> None:
    # stdout is a pipe: a progress line every PROGRESS_LINE_INTERVAL (5) s on stderr, instead of a bar.
    result = run_cli("bench", served.target, "--call", ECHO, "--rps", "20", "-z", "6s", "-n", "1000000")
    assert result.returncode == 0, result.stderr
    assert "rpcframe: warning: -n 1000000 and -z 6s both given: the run stops at whichever comes first" in result.stderr
    assert re.search(r"^rpcframe bench: \w+: \d+ calls in \d+s", result.stderr, re.M), result.stderr


def test_health_probe_headers_user_agent_gzip_and_verbose() -> None:
    """-rpc-header and -user-agent reach the server (a raw grpcio one, recording the check), a -gzip check is
    answered (grpc hides the encoding header from handlers), -v times it."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    seen: list[dict[str, str]] = []

    class Recording(health.HealthServicer):  # type: ignore[misc]
        def Check(self, request: object, context: grpc.ServicerContext) -> object:  # noqa: N802
            seen.append(dict(context.invocation_metadata()))
            return super().Check(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    recording = Recording()
    recording.set("", 1)  # SERVING
    health_pb2_grpc.add_HealthServicer_to_server(recording, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = run_cli("health", "-addr", f"127.0.0.1:{port}", "-rpc-header", "X-Probe: kubelet",
                         "-rpc-header", "x-zone:a", "-user-agent", "probe/1", "-gzip", "-v")  # fmt: skip
        bad = run_cli("health", "-addr", f"127.0.0.1:{port}", "-rpc-header", "no colon")
    finally:
        server.stop(0)
    assert (result.returncode, result.stdout) == (0, "SERVING\n"), result.stderr
    assert f"127.0.0.1:{port}: answered in " in result.stderr
    headers = seen[-1]
    assert headers["x-probe"] == "kubelet"
    assert headers["x-zone"] == "a"
    assert headers["user-agent"].startswith("probe/1")
    assert_cli_error(bad, 1, "-rpc-header 'no colon': expected 'KEY: VALUE'")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--accept-queue", "0"), "--accept-queue: overload: accept_queue must be >= 1"),
        (("--accept-queue", "8", "--no-overload-protection"), "--accept-queue is part of overload protection"),
    ],
)
def test_serve_refuses_bad_accept_queue(flags: tuple[str, ...], message: str) -> None:
    assert_cli_error(run_cli("serve", "examples.echo:servicer", "--bind", "127.0.0.1:0", *flags), 2, message)
