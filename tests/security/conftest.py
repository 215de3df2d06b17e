"""Test material made at test time: a CA with server and client certificates, JWT keys."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://issuer.test"
AUDIENCE = "rpcframe-tests"
HS_SECRET = b"0123456789abcdef0123456789abcdef-test-secret"


@dataclass
class Pki:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, on disk and in memory."""

    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    dir: Path

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    @staticmethod
    def chain(leaf: trustme.LeafCert) -> bytes:
        return b"".join(p.bytes() for p in leaf.cert_chain_pems)

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    @property
    def server_files(self) -> tuple[Path, Path]:
        return self.dir / "server.pem", self.dir / "server.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.test", "svc@client.test", common_name="client-cn")
    out = Pki(ca, server, client, tmp_path_factory.mktemp("pki"))
    out.write("server.pem", Pki.chain(server))
    out.write("server.key", server.private_key_pem.bytes())
    out.write("ca.pem", out.ca_pem)
    return out


@dataclass
class Signers:
    """JWT signing keys (private) and their public halves."""

    rsa_private: bytes
    rsa_public: bytes
    ec_private: bytes
    ec_public: bytes

    def token(self, alg: str = "RS256", headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 300, "iat": now}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        key: Any = {"RS256": self.rsa_private, "ES256": self.ec_private, "HS256": HS_SECRET}[alg]
        return jwt.encode(body, key, algorithm=alg, headers=headers)


def _pem_pair(private: Any) -> tuple[bytes, bytes]:
    priv = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return priv, pub


@pytest.fixture(scope="session")
def signers() -> Signers:
    rsa_priv, rsa_pub = _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_priv, ec_pub = _pem_pair(ec.generate_private_key(ec.SECP256R1()))
    return Signers(rsa_priv, rsa_pub, ec_priv, ec_pub)


def server_tls(pki: Pki, *, mutual: bool = True) -> Any:
    from rpcframe.security import TLSConfig

    cert, key = pki.server_files
    return TLSConfig.for_server(cert, key, client_ca=pki.ca_pem if mutual else None)


def client_tls(pki: Pki, *, cert: bool = True, ca: bytes | None = None, server_name: str | None = None) -> Any:
    from rpcframe.security import TLSConfig

    leaf = pki.client
    return TLSConfig.for_client(
        ca or pki.ca_pem,
        cert=Pki.chain(leaf) if cert else None,
        key=leaf.private_key_pem.bytes() if cert else None,
        server_name=server_name,
    )


def jwt_config(signers: Signers, **over: Any) -> Any:
    from rpcframe.security import JWTConfig, JWTKey

    keys = (JWTKey(signers.rsa_public, "RS256"), JWTKey(signers.ec_public, "ES256"), JWTKey(HS_SECRET, "HS256"))
    return JWTConfig(issuer=ISSUER, audience=AUDIENCE, keys=keys, **over)


def jwk(public: bytes, kid: str, alg: str) -> dict[str, Any]:
    """The public JWK of a PEM key, with its kid and alg."""
    algo = jwt.get_algorithm_by_name(alg)
    out: dict[str, Any] = json.loads(algo.to_jwk(algo.prepare_key(public)))
    return {**out, "kid": kid, "alg": alg}


def write_jwks(path: Path, *keys: dict[str, Any], atomic: bool = True) -> None:
    """Write a key set: renamed into place (how it is usually deployed) or rewritten in place."""
    text = json.dumps({"keys": list(keys)})
    if atomic:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    else:
        path.write_text(text)
