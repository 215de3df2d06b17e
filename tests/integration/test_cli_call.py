"""`rpcframe call` as a subprocess against the scripted echo server."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rpcframe
from rpcframe.security import TLSConfig
from tests.cli import assert_cli_error, run_cli
from tests.conftest import Running, wait_until
from tests.servicers import ScriptedEcho

ECHO = "rpcframe.echo.v1.EchoService"


def _call(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("call", *args, stdin=stdin)


def _lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_unary_by_reflection_with_metadata(sync_server: Running) -> None:
    result = _call(sync_server.target, f"{ECHO}/Echo", "-d", '{"message": "hi"}', "--reflection", "-v",
                   "-H", "x-trace: abc", "-H", "Echo-Tag: 7")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout) == [{"message": "hi"}]
    assert f"method: /{ECHO}/Echo (unary, types from reflection)" in result.stderr
    # The echo servicer returns echo-* keys as headers and x-* keys as trailers.
    assert "header: echo-tag: 7" in result.stderr
    assert "trailer: x-trace: abc" in result.stderr


def test_unary_with_proto_module(sync_server: Running) -> None:
    result = _call(sync_server.target, f"{ECHO}/Echo", "-d", '{"message": "stub"}', "--emit-defaults", "-v",
                   "--proto-module", "generated.rpcframe.echo.v1.echo_pb2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout) == [{"message": "stub", "index": 0}]
    assert "types from stubs" in result.stderr
    broken = _call(sync_server.target, f"{ECHO}/Echo", "--proto-module", "generated.no_such_pb2")
    assert_cli_error(broken, 1, "cannot import --proto-module 'generated.no_such_pb2'")


def test_server_streaming_prints_one_line_per_response(sync_server: Running) -> None:
    result = _call(sync_server.target, f"{ECHO}/Expand", "-d", '{"message": "tick", "count": 3}')
    assert result.returncode == 0, result.stderr
    # Proto field names; index 0 is the default value, left out unless --emit-defaults.
    assert _lines(result.stdout) == [{"message": "tick"}] + [{"message": "tick", "index": i} for i in (1, 2)]


def test_client_streaming_from_stdin(sync_server: Running) -> None:
    stdin = '{"message": "a"}\n\n{"message": "b"}\n{"message": "c"}\n'
    result = _call(sync_server.target, f"{ECHO}/Collect", "-d", "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout) == [{"count": 3, "message": "abc"}]


def test_bidi_streaming_from_file(sync_server: Running, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"message": "x"}\n{"message": "y"}\n')
    result = _call(sync_server.target, f"{ECHO}/Chat", "-d", f"@{requests}", "--reflection")
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout) == [{"message": "x"}, {"message": "y", "index": 1}]


def test_error_status_exit_code_and_trailers(sync_server: Running) -> None:
    result = _call(sync_server.target, f"{ECHO}/Echo", "-d", '{"message": "raise:NotFound:gone"}', "-v")
    assert_cli_error(result, 64 + 5, "rpcframe: error: NOT_FOUND: gone")
    assert result.stderr.splitlines()[-1] == "rpcframe: error: NOT_FOUND: gone"
    assert "trailer: x-error-ref: 42" in result.stderr


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"message": ', "-d: not JSON: Expecting value"),
        ('{"mesage": "typo"}', 'has no field named "mesage"'),
        ('["not", "an", "object"]', "expected a JSON object (a rpcframe.echo.v1.EchoRequest), got an array"),
    ],
    ids=["malformed", "unknown-field", "not-an-object"],
)
def test_bad_json_is_a_usage_error(sync_server: Running, data: str, message: str) -> None:
    assert_cli_error(_call(sync_server.target, f"{ECHO}/Echo", "-d", data), 2, message)
    assert sync_server.servicer.calls == 0  # type: ignore[attr-defined]


class _CollectRecorder(ScriptedEcho):
    """Records whether a Collect stream reached its end or was cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[str] = []
        self.completed = False
        self.done = threading.Event()

    def Collect(self, request_iterator: Iterator[Any], context: Any) -> Any:
        try:
            self.received.extend(r.message for r in request_iterator)
            self.completed = True
            return super().Collect(iter(()), context)
        finally:
            self.done.set()


def test_bad_line_in_client_stream_cancels_the_call() -> None:
    servicer = _CollectRecorder()
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1.0))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    server.start()
    try:
        result = _call(f"127.0.0.1:{port}", f"{ECHO}/Collect", "-d", "-", stdin='{"message": "a"}\n{"nope": 1}\n')
        assert_cli_error(result, 2, "stdin line 2: not a valid rpcframe.echo.v1.EchoRequest: Message type")
        assert 'no field named "nope"' in result.stderr
        # The CLI cancels instead of half-closing, so the server never gets
        # the bad line. (grpcio's thread-pool server can still end a
        # cancelled request stream with StopIteration before it records the
        # cancellation, so "completed" cannot be asserted either way.)
        wait_until(lambda: server.inflight == 0)
        assert servicer.received in ([], ["a"])
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (f"{ECHO}/Nope", f"service {ECHO} has no method 'Nope' (it has: Chat, Collect, Echo, Expand)"),
        ("nope.v1.Missing/Get", f"does not serve 'nope.v1.Missing' (it serves: {ECHO})"),
    ],
    ids=["method", "service"],
)
def test_unknown_method_or_service(sync_server: Running, method: str, message: str) -> None:
    assert_cli_error(_call(sync_server.target, method), 1, message)


def test_unreachable_target_fails_fast() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    start = time.monotonic()
    result = _call(target, f"{ECHO}/Echo", "-d", '{"message": "hi"}')
    assert time.monotonic() - start < 5  # far below the 10 s default deadline
    assert_cli_error(result, 64 + 14, "rpcframe: error: UNAVAILABLE: ")


def test_list_services(sync_server: Running) -> None:
    result = _call(sync_server.target, "--list")
    assert result.returncode == 0, result.stderr
    reflection = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]
    assert result.stdout.splitlines() == ["grpc.health.v1.Health", *reflection, ECHO]


#: What --describe shows of the echo contract's methods (all marked NO_SIDE_EFFECTS).
SAFE = " { option idempotency_level = NO_SIDE_EFFECTS; }"


def test_describe_service_and_method(sync_server: Running) -> None:
    service = _call(sync_server.target, "--describe", ECHO)
    assert service.returncode == 0, service.stderr
    assert service.stdout.splitlines() == [
        f"service {ECHO} {{",
        f"  rpc Echo(rpcframe.echo.v1.EchoRequest) returns (rpcframe.echo.v1.EchoResponse){SAFE}",
        f"  rpc Expand(rpcframe.echo.v1.ExpandRequest) returns (stream rpcframe.echo.v1.EchoResponse){SAFE}",
        f"  rpc Collect(stream rpcframe.echo.v1.EchoRequest) returns (rpcframe.echo.v1.CollectResponse){SAFE}",
        f"  rpc Chat(stream rpcframe.echo.v1.EchoRequest) returns (stream rpcframe.echo.v1.EchoResponse){SAFE}",
        "}",
    ]
    health = _call(sync_server.target, "--describe", "grpc.health.v1.Health")  # no idempotency level: none shown
    assert "  rpc Check(grpc.health.v1.HealthCheckRequest) returns (grpc.health.v1.HealthCheckResponse);" in (
        health.stdout.splitlines()
    )
    method = _call(sync_server.target, "--describe", f"{ECHO}/Expand")
    assert method.returncode == 0, method.stderr
    assert method.stdout.splitlines() == [
        f"{ECHO}/Expand(rpcframe.echo.v1.ExpandRequest) returns (stream rpcframe.echo.v1.EchoResponse){SAFE}",
        "message rpcframe.echo.v1.ExpandRequest {",
        "  string message = 1;",
        "  uint32 count = 2;",
        "}",
        "message rpcframe.echo.v1.EchoResponse {",
        "  string message = 1;",
        "  uint32 index = 2;",
        "}",
    ]


def test_token_over_plaintext_is_refused() -> None:
    # 0.0.0.0 is not loopback to the check; were the refusal broken, nothing would leave the machine.
    result = _call("0.0.0.0:50051", f"{ECHO}/Echo", "--token", "secret")
    assert_cli_error(result, 2, "--token is not sent in clear text to 0.0.0.0:50051")


@pytest.fixture
def mtls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.test")
    for name, pem in (("ca.pem", ca.cert_pem), ("server.key", leaf.private_key_pem),
                      ("client.key", client.private_key_pem)):  # fmt: skip
        pem.write_to_path(str(tmp_path / name))
    (tmp_path / "server.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (tmp_path / "client.pem").write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
    tls = TLSConfig.for_server(tmp_path / "server.pem", tmp_path / "server.key", client_ca=tmp_path / "ca.pem")
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1.0, tls=tls))
    server.add(ScriptedEcho())
    port = server.bind("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", tmp_path
    server.stop(0)


def test_mtls_flags(mtls_server: tuple[str, Path]) -> None:
    target, pki = mtls_server
    result = _call(target, f"{ECHO}/Echo", "-d", '{"message": "secure"}', "--reflection", "--server-name", "localhost",
                   "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
                   "--tls-key", str(pki / "client.key"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout) == [{"message": "secure"}]
