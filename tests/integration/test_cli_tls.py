"""`rpcframe serve` / `health` / `call` over TLS and mTLS, with API keys and JWTs: real subprocesses.

Certificates are made at test time (trustme), JWT keys too. Each server is a
`rpcframe serve` child process, stopped by PID with SIGTERM.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.cli import ServeProcess, assert_cli_error, run_cli
from tests.security.conftest import AUDIENCE, ISSUER, Pki

ECHO = "rpcframe.echo.v1.EchoService/Echo"
API_KEY = "key-" + secrets.token_hex(16)
UNAUTHENTICATED = 64 + 16  # `rpcframe call` exits with 64 + the gRPC status


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """ca.pem, server.pem/.key (localhost, 127.0.0.1), client.pem/.key, keys.txt, jwks.json and a JWT signing key."""
    ca = trustme.CA()
    out = Pki(ca, ca.issue_cert("localhost", "127.0.0.1"), ca.issue_cert("client.test"), tmp_path_factory.mktemp("pki"))
    out.write("ca.pem", out.ca_pem)
    out.write("server.pem", Pki.chain(out.server))
    out.write("server.key", out.server.private_key_pem.bytes())
    out.write("client.pem", Pki.chain(out.client))
    out.write("client.key", out.client.private_key_pem.bytes())
    out.write("keys.txt", f"# name:key\nci-bot:{API_KEY}\n\nother: key-{secrets.token_hex(16)}\n".encode())
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    out.write("jwks.json", json.dumps({"keys": [jwk]}).encode())
    out.write("jwt-signing.key", signing.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))  # fmt: skip
    return out


def _token(pki: Pki, expires_in: int = 300) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + expires_in}
    return jwt.encode(claims, (pki.dir / "jwt-signing.key").read_bytes(), algorithm="RS256", headers={"kid": "k1"})


def _echo_server(*flags: str) -> ServeProcess:
    """``rpcframe serve examples.echo:servicer`` with ``flags``; its ready line is unchanged by TLS."""
    return ServeProcess(
        "examples.echo:servicer", "--bind", "127.0.0.1:0", "--grace", "1", *flags,
        ready=r"serving on (127\.0\.0\.1:\d+)\n", within=20,
    )  # fmt: skip


@contextmanager
def _serve(*flags: str) -> Iterator[ServeProcess]:
    server = _echo_server(*flags)
    try:
        yield server
    except BaseException:
        server.kill()
        raise
    server.terminate()


def _tls_flags(pki: Pki) -> tuple[str, ...]:
    return "--tls-cert", str(pki.dir / "server.pem"), "--tls-key", str(pki.dir / "server.key")


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[ServeProcess]:
    with _serve(*_tls_flags(pki)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServeProcess]:
    with _serve(*_tls_flags(pki), "--client-ca", str(pki.dir / "ca.pem")) as server:
        yield server


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=30)


def _ok(result: subprocess.CompletedProcess[str], stdout: str) -> None:
    assert (result.returncode, result.stdout.strip()) == (0, stdout), result.stderr


# --- health over TLS and mTLS ------------------------------------------------------------------------


def test_health_over_tls(tls_server: ServeProcess, pki: Pki) -> None:
    _ok(_cli("health", tls_server.target, "--tls-ca", str(pki.dir / "ca.pem")), "SERVING")
    # The certificate names localhost too: --server-name checks (and sends) that name instead.
    _ok(_cli("health", tls_server.target, "--tls-ca", str(pki.dir / "ca.pem"), "--server-name", "localhost"),
        "SERVING")  # fmt: skip


def test_plaintext_health_against_tls_server_fails_fast(tls_server: ServeProcess) -> None:
    start = time.monotonic()
    result = _cli("health", tls_server.target, "--timeout", "20")
    assert time.monotonic() - start < 10  # a failed connection is not waited on for the whole --timeout
    assert_cli_error(result, 2, "accepts connections but not plaintext gRPC: if it serves TLS, add --tls or --tls-ca")


def test_untrusted_server_certificate(tls_server: ServeProcess, pki: Pki) -> None:
    other_ca = pki.write("other-ca.pem", trustme.CA().cert_pem.bytes())
    result = _cli("health", tls_server.target, "--tls-ca", str(other_ca), "--timeout", "20")
    assert_cli_error(result, 2, "the TLS connection failed: check --tls-ca and --server-name")


def test_mtls_health_needs_a_client_certificate(mtls_server: ServeProcess, pki: Pki) -> None:
    ca = str(pki.dir / "ca.pem")
    start = time.monotonic()
    without = _cli("health", mtls_server.target, "--tls-ca", ca, "--timeout", "20")
    assert time.monotonic() - start < 10
    assert_cli_error(without, 2, "a server that requires client certificates also needs --tls-cert and --tls-key")
    with_cert = _cli("health", mtls_server.target, "--tls-ca", ca,
                     "--tls-cert", str(pki.dir / "client.pem"), "--tls-key", str(pki.dir / "client.key"))  # fmt: skip
    _ok(with_cert, "SERVING")


# --- API keys and JWTs ---------------------------------------------------------------------------------


def test_api_keys(pki: Pki) -> None:
    with _serve(*_tls_flags(pki), "--api-key-file", str(pki.dir / "keys.txt")) as server:
        call = ("call", server.target, ECHO, "-d", '{"message": "hi"}', "--tls-ca", str(pki.dir / "ca.pem"))
        assert_cli_error(_cli(*call), UNAUTHENTICATED, "UNAUTHENTICATED: missing credentials")
        _ok(_cli(*call, "--token", API_KEY), '{"message": "hi"}')
        _ok(_cli(*call, "-H", f"x-api-key: {API_KEY}"), '{"message": "hi"}')
        assert_cli_error(_cli(*call, "--token", "key-wrong"), UNAUTHENTICATED, "UNAUTHENTICATED: unknown API key")
        # Health stays open to callers without a key.
        _ok(_cli("health", server.target, "--tls-ca", str(pki.dir / "ca.pem")), "SERVING")


def test_jwt(pki: Pki) -> None:
    jwt_flags = ("--jwt-jwks", str(pki.dir / "jwks.json"), "--jwt-issuer", ISSUER,
                 "--jwt-audience", "someone-else", "--jwt-audience", AUDIENCE)  # fmt: skip
    with _serve("--api-key-file", str(pki.dir / "keys.txt"), *jwt_flags) as server:
        # Plaintext, to loopback only (where `call` sends a token in clear text).
        call = ("call", server.target, ECHO, "-d", '{"message": "hi"}')
        assert_cli_error(_cli(*call), UNAUTHENTICATED, "missing credentials")
        _ok(_cli(*call, "--token", _token(pki)), '{"message": "hi"}')
        assert_cli_error(_cli(*call, "--token", _token(pki, expires_in=-3600)), UNAUTHENTICATED, "JWT expired")
        _ok(_cli(*call, "-H", f"x-api-key: {API_KEY}"), '{"message": "hi"}')  # both kinds are accepted


@pytest.mark.parametrize("client", ["rpcframe", "raw"])
def test_bench_over_tls_with_a_key(pki: Pki, client: str, tmp_path: Path) -> None:
    with _serve(*_tls_flags(pki), "--api-key-file", str(pki.dir / "keys.txt")) as server:
        bench = ("bench", server.target, "--call", ECHO, "-d", '{"message": "hi"}', "-n", "20", "--no-progress",
                 "--client", client, "--reflection", "--tls-ca", str(pki.dir / "ca.pem"))  # fmt: skip
        for auth in (("--token", API_KEY), ("-H", f"x-api-key: {API_KEY}")):
            out = tmp_path / f"{auth[0]}.json"
            result = _cli(*bench, *auth, "--json", str(out))
            assert result.returncode == 0, result.stderr
            assert json.loads(out.read_text())["summary"]["ok"] == 20
        # Without a key every call is refused: the summary says why and the run fails.
        refused = _cli(*bench)
        assert refused.returncode == 1, refused.stderr
        assert "every call failed (20 calls, none OK)" in refused.stderr
        assert "UNAUTHENTICATED" in refused.stdout


# --- bad flags -------------------------------------------------------------------------------------------

SERVE = ("serve", "examples.echo:servicer", "--bind", "127.0.0.1:0")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((*SERVE, "--tls-cert", "{dir}/server.pem"), "--tls-cert and --tls-key go together"),
        ((*SERVE, "--tls-key", "{dir}/server.key"), "--tls-cert and --tls-key go together"),
        ((*SERVE, "--client-ca", "{dir}/ca.pem"), "--client-ca needs --tls-cert and --tls-key"),
        ((*SERVE, "--tls-cert", "{dir}/missing.pem", "--tls-key", "{dir}/server.key"),
         "--tls-cert: cannot read '{dir}/missing.pem': No such file or directory"),
        ((*SERVE, "--tls-cert", "{dir}/server.pem", "--tls-key", "{dir}/client.key"),
         "--tls-key is not the key of --tls-cert"),
        ((*SERVE, "--tls-cert", "{dir}/server.pem", "--tls-key", "{dir}/server.key", "--client-ca", "{dir}/keys.txt"),
         "--client-ca: not PEM data"),
        ((*SERVE, "--api-key-file", "{dir}/missing.txt"), "--api-key-file: cannot read '{dir}/missing.txt'"),
        ((*SERVE, "--api-key-file", "{dir}/ca.pem"), "--api-key-file {dir}/ca.pem line 1: expected NAME:KEY"),
        ((*SERVE, "--jwt-issuer", ISSUER), "--jwt-jwks, --jwt-issuer and --jwt-audience go together"),
        ((*SERVE, "--jwt-jwks", "{dir}/missing.json", "--jwt-issuer", "i", "--jwt-audience", "a"),
         "--jwt-jwks '{dir}/missing.json': No such file or directory"),
        (("health", "127.0.0.1:1", "--tls-cert", "{dir}/client.pem"), "--tls-cert and --tls-key go together"),
        (("health", "127.0.0.1:1", "--tls-ca", "{dir}/missing.pem"), "--tls-ca: cannot read"),
        (("health", "0.0.0.0:50051", "--token", "t"), "--token is not sent in clear text to 0.0.0.0:50051"),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else re.sub(r"\W+", "-", value.replace("{dir}/", ""))[:40],
)  # fmt: skip
def test_bad_flags(pki: Pki, args: tuple[str, ...], message: str) -> None:
    start = time.monotonic()
    result = _cli(*(a.format(dir=pki.dir) for a in args))
    assert time.monotonic() - start < 10  # refused before serving or connecting
    # health follows grpc-health-probe: 1 for invalid arguments.
    assert_cli_error(result, 1 if args[0] == "health" else 2, message.format(dir=pki.dir))
