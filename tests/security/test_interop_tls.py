"""A third-party client (the buf CLI, from npm) calls rpcframe servers over TLS and mTLS."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

import rpcframe
from rpcframe.security import AuthConfig, Policy, Rule
from tests.conftest import run_process
from tests.security.conftest import Pki, Signers, jwt_config, server_tls
from tests.security.servers import ECHO, serve_aio, serve_sync

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
PROTOS = ROOT / "protos"

pytestmark = pytest.mark.interop


def _buf() -> str:
    if BUF.exists():
        return str(BUF)
    found = shutil.which("buf")
    if found is None:
        pytest.fail("buf CLI missing: run `make setup` (npm ci installs @bufbuild/buf)")
    return found


def _args(pki: Pki, target: str, method: str, *extra: str) -> list[str]:
    return [_buf(), "curl", "--protocol", "grpc", "--cacert", str(pki.dir / "ca.pem"), *extra,
            "-d", "{}", f"https://{target}/{method}"]  # fmt: skip


def _client_cert_args(pki: Pki) -> tuple[str, ...]:
    cert = pki.write("client.pem", Pki.chain(pki.client))
    key = pki.write("client.key", pki.client.private_key_pem.bytes())
    return "--cert", str(cert), "--key", str(key)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def tls_jwt_server(pki: Pki, signers: Signers) -> Iterator[str]:
    """TLS (no client certificates) + JWT with a policy; reflection stays open."""
    auth = AuthConfig(jwt=jwt_config(signers), policy=Policy((Rule((ECHO,), principals=("alice",)),)))
    server, target = serve_sync(rpcframe.ServerConfig(tls=server_tls(pki, mutual=False), auth=auth))
    yield target
    server.stop(0)


def test_buf_over_tls_with_a_bearer_token(tls_jwt_server: str, pki: Pki, signers: Signers) -> None:
    ok = _run(_args(pki, tls_jwt_server, ECHO.lstrip("/"), "-H", f"authorization: Bearer {signers.token()}"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"message": "jwt:alice"}
    missing = _run(_args(pki, tls_jwt_server, ECHO.lstrip("/")))
    assert missing.returncode != 0
    assert "unauthenticated" in missing.stderr.lower()
    assert "missing credentials" in missing.stderr
    bob = f"authorization: Bearer {signers.token(sub='bob')}"
    denied = _run(_args(pki, tls_jwt_server, ECHO.lstrip("/"), "-H", bob))
    assert denied.returncode != 0
    assert "permission_denied" in denied.stderr.lower().replace(" ", "_")


def test_buf_refuses_a_server_it_cannot_verify(tls_jwt_server: str, pki: Pki, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    args = _args(pki, tls_jwt_server, ECHO.lstrip("/"), "--schema", str(PROTOS))  # no reflection: see the TLS error
    args[args.index("--cacert") + 1] = str(other)
    result = _run(args)
    assert result.returncode != 0
    assert "certificate signed by unknown authority" in result.stderr


async def test_buf_over_mtls_to_the_asyncio_server(pki: Pki) -> None:
    server, target = await serve_aio(rpcframe.ServerConfig(tls=server_tls(pki), auth=AuthConfig(mtls=True)))
    try:
        code, out, err = await run_process(_args(pki, target, ECHO.lstrip("/"), *_client_cert_args(pki)))
        assert code == 0, err
        assert json.loads(out) == {"message": "mtls:client.test"}
        # No client certificate: the handshake is refused, the call never reaches the server's code.
        # buf reports the closed connection as "unavailable" or, when it was still writing, as
        # "canceled" with a broken pipe.
        code, out, err = await run_process(_args(pki, target, ECHO.lstrip("/"), "--schema", str(PROTOS)))
        assert code != 0
        assert not out.strip()
        assert '"code": "unavailable"' in err or ('"code": "canceled"' in err and "broken pipe" in err), err
    finally:
        await server.stop(0)
