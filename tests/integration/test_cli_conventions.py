"""Command-line conventions of every subcommand (issue 16, "CLI"): real ``rpcframe`` subprocesses."""

from __future__ import annotations

import re
import time

import pytest

import rpcframe
from tests.cli import ServeProcess, assert_cli_error, run_cli

ECHO = "rpcframe.echo.v1.EchoService/Echo"


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"rpcframe {rpcframe.__version__}\n", "")


@pytest.fixture(scope="module")
def served() -> object:
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
    assert result.returncode == 2, result.stderr
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
    assert_cli_error(result, 2, message)
