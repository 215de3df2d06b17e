"""Key revocation through the JWKS file, repeated credential headers, and no echo of the caller's text.

End to end on real servers (thread-pool and asyncio) on 127.0.0.1, with real
RSA/EC keys: the JWKS file is edited on disk while the server runs, and a
token signed by the removed key (already verified and cached by the server)
must be refused within a second, while tokens of the remaining keys pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.security import ApiKeys, AuthConfig, JWTConfig
from tests.conftest import wait_until
from tests.security.conftest import AUDIENCE, ISSUER, Signers, jwk, write_jwks
from tests.security.servers import serve_aio, serve_sync
from tests.security.test_auth_unit import _b64, _claims

EchoStub = echo_pb2_grpc.EchoServiceStub
TIMEOUT = 5.0
#: The promise: a removed key's tokens are refused this soon after the file changes.
WITHIN = 1.0
UNKNOWN_KEY = "JWT signed by an unknown key"
#: Caller-chosen text that must never come back in a status message.
EVIL = "evil-<script>-kid"


@pytest.fixture
def keyset(signers: Signers) -> dict[str, dict[str, Any]]:
    return {"r1": jwk(signers.rsa_public, "r1", "RS256"), "e1": jwk(signers.ec_public, "e1", "ES256")}


@pytest.fixture
def jwks_path(tmp_path: Path, keyset: dict[str, dict[str, Any]]) -> Path:
    path = tmp_path / "jwks.json"
    write_jwks(path, keyset["r1"], keyset["e1"])
    return path


def _server_config(jwks_path: Path, **auth: Any) -> rpcframe.ServerConfig:
    jwt_config = JWTConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks_path)
    return rpcframe.ServerConfig(auth=AuthConfig(jwt=jwt_config, **auth), grace_period=1)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _tokens(signers: Signers) -> tuple[str, str]:
    """A token of the key that will be removed (r1) and one of the key that stays (e1)."""
    return signers.token("RS256", headers={"kid": "r1"}), signers.token("ES256", headers={"kid": "e1"})


# -- thread-pool server --------------------------------------------------------


@pytest.fixture
def sync_target(jwks_path: Path) -> Iterator[str]:
    server, target = serve_sync(_server_config(jwks_path))
    yield target
    server.stop(0)


@pytest.fixture
def sync_stub(sync_target: str) -> Iterator[Any]:
    with rpcframe.connect(sync_target, rpcframe.ChannelConfig(default_timeout=TIMEOUT)) as channel:
        yield channel.stub(EchoStub)


def _echo(stub: Any, metadata: Any) -> str:
    return str(stub.Echo(pb.EchoRequest(message="hi"), metadata=metadata).message)


def _refusal(stub: Any, metadata: Any) -> str:
    """The details of the UNAUTHENTICATED status the call must end with."""
    with pytest.raises(rpcframe.Unauthenticated) as info:
        _echo(stub, metadata)
    return str(info.value.details())


def _refused_within(stub: Any, token: str, within: float) -> str:
    """Call with ``token`` until it is refused (bounded by ``within`` seconds); the refusal's details."""
    details: list[str] = []

    def refused() -> bool:
        try:
            _echo(stub, _bearer(token))
        except rpcframe.Unauthenticated as exc:
            details.append(str(exc.details()))
            return True
        return False

    wait_until(refused, timeout=within, interval=0.01)
    return details[0]


@pytest.mark.parametrize("atomic", [True, False], ids=["renamed", "in-place"])
def test_removed_key_is_refused_within_a_second_sync(
    sync_stub: Any, jwks_path: Path, keyset: dict[str, dict[str, Any]], signers: Signers, atomic: bool
) -> None:
    removed, kept = _tokens(signers)
    for token in (removed, kept, removed, kept):  # verified once, then served from the cache
        assert _echo(sync_stub, _bearer(token)) == "jwt:alice"
    write_jwks(jwks_path, keyset["e1"], atomic=atomic)
    changed = time.monotonic()
    assert _refused_within(sync_stub, removed, WITHIN) == UNKNOWN_KEY
    assert time.monotonic() - changed <= WITHIN
    # The remaining key's tokens pass: the cached one and a new one.
    assert _echo(sync_stub, _bearer(kept)) == "jwt:alice"
    assert _echo(sync_stub, _bearer(signers.token("ES256", headers={"kid": "e1"}, sub="bob"))) == "jwt:bob"
    # And the removed key stays refused, also for a token it signs afresh.
    assert _refusal(sync_stub, _bearer(removed)) == UNKNOWN_KEY
    assert _refusal(sync_stub, _bearer(signers.token("RS256", headers={"kid": "r1"}, sub="x"))) == UNKNOWN_KEY


def test_broken_jwks_file_keeps_the_last_good_keys_and_never_readmits_a_removed_one(
    sync_stub: Any, jwks_path: Path, keyset: dict[str, dict[str, Any]], signers: Signers
) -> None:
    removed, kept = _tokens(signers)
    assert _echo(sync_stub, _bearer(removed)) == "jwt:alice"
    write_jwks(jwks_path, keyset["e1"])
    assert _refused_within(sync_stub, removed, WITHIN) == UNKNOWN_KEY
    # A half-written file: the server keeps the last good set ({e1}), it does
    # not fall back to an older one ({r1, e1}) nor lock everybody out.
    jwks_path.write_text('{"keys": [')
    until = time.monotonic() + 2 * WITHIN  # long enough for the server to check the file twice
    for _ in range(400):  # paced calls, bounded in count and time
        assert _refusal(sync_stub, _bearer(removed)) == UNKNOWN_KEY
        assert _echo(sync_stub, _bearer(kept)) == "jwt:alice"
        if time.monotonic() > until:
            break
        time.sleep(0.01)
    # Fixed by writing the key set back: the file decides again.
    write_jwks(jwks_path, keyset["r1"], keyset["e1"])
    wait_until(lambda: _echo_or_none(sync_stub, removed) == "jwt:alice", timeout=WITHIN, interval=0.01)


def _echo_or_none(stub: Any, token: str) -> str | None:
    try:
        return _echo(stub, _bearer(token))
    except rpcframe.Unauthenticated:
        return None


def test_empty_key_set_revokes_every_jwks_key(
    sync_stub: Any, jwks_path: Path, keyset: dict[str, dict[str, Any]], signers: Signers
) -> None:
    removed, also_removed = _tokens(signers)
    assert _echo(sync_stub, _bearer(also_removed)) == "jwt:alice"
    write_jwks(jwks_path)
    assert _refused_within(sync_stub, also_removed, WITHIN) == UNKNOWN_KEY
    assert _refusal(sync_stub, _bearer(removed)) == UNKNOWN_KEY


def test_two_authorization_headers_are_unauthenticated(sync_stub: Any, signers: Signers) -> None:
    good = _bearer(signers.token("RS256", headers={"kid": "r1"}))
    assert _echo(sync_stub, good) == "jwt:alice"
    # Even two valid copies: which one a proxy or a handler would read is anyone's guess.
    assert _refusal(sync_stub, good + good) == "more than one authorization header"
    other = _bearer(signers.token("ES256", headers={"kid": "e1"}, sub="mallory"))
    assert _refusal(sync_stub, good + other) == "more than one authorization header"


def test_two_api_key_headers_are_unauthenticated(signers: Signers, jwks_path: Path) -> None:
    config = _server_config(jwks_path, api_keys=ApiKeys.from_plain({"ci": "key-ci-1", "ops": "key-ops-1"}))
    server, target = serve_sync(config)
    try:
        with rpcframe.connect(target, rpcframe.ChannelConfig(default_timeout=TIMEOUT)) as channel:
            stub = channel.stub(EchoStub)
            assert _echo(stub, (("x-api-key", "key-ci-1"),)) == "api_key:ci"
            two = (("x-api-key", "key-ci-1"), ("x-api-key", "key-ops-1"))
            assert _refusal(stub, two) == "more than one x-api-key header"
    finally:
        server.stop(0)


def _hand_made(header: dict[str, Any]) -> str:
    """A token with the caller's own header (and a made-up signature)."""
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}.{_b64(b'x' * 64)}"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (_bearer(_hand_made({"alg": "RS256", "kid": EVIL})), UNKNOWN_KEY),
        (_bearer(_hand_made({"alg": "ES256", "kid": EVIL, "typ": "JWT"})), UNKNOWN_KEY),
        (_bearer(_hand_made({"alg": EVIL, "kid": "r1"})), "JWT algorithm not accepted (use HS256, RS256, ES256)"),
        (_bearer(_hand_made({"alg": "RS256", "crit": [EVIL], EVIL: 1})), "malformed JWT"),
        ((("authorization", f"{EVIL} credential"),), "authorization scheme not accepted (use Bearer)"),
    ],
    ids=["kid", "kid-es256", "alg", "crit", "scheme"],
)
def test_status_messages_do_not_echo_the_callers_text(sync_stub: Any, metadata: Any, expected: str) -> None:
    details = _refusal(sync_stub, metadata)
    assert details == expected
    assert "evil" not in details.lower()


# -- asyncio server ------------------------------------------------------------


@pytest.fixture
async def aio_stub(jwks_path: Path) -> AsyncIterator[Any]:
    server, target = await serve_aio(_server_config(jwks_path))
    try:
        async with rpcframe.aio.connect(target, rpcframe.ChannelConfig(default_timeout=TIMEOUT)) as channel:
            yield channel.stub(EchoStub)
    finally:
        await server.stop(0)


async def _aio_echo(stub: Any, metadata: Any) -> str:
    return str((await stub.Echo(pb.EchoRequest(message="hi"), metadata=metadata)).message)


async def _aio_refusal(stub: Any, metadata: Any) -> str:
    with pytest.raises(rpcframe.Unauthenticated) as info:
        await _aio_echo(stub, metadata)
    return str(info.value.details())


async def _aio_refused_within(stub: Any, token: str, within: float) -> str:
    async with asyncio.timeout(within):
        while True:
            try:
                await _aio_echo(stub, _bearer(token))
            except rpcframe.Unauthenticated as exc:
                return str(exc.details())
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("atomic", [True, False], ids=["renamed", "in-place"])
async def test_removed_key_is_refused_within_a_second_aio(
    aio_stub: Any, jwks_path: Path, keyset: dict[str, dict[str, Any]], signers: Signers, atomic: bool
) -> None:
    removed, kept = _tokens(signers)
    for token in (removed, kept, removed, kept):
        assert await _aio_echo(aio_stub, _bearer(token)) == "jwt:alice"
    write_jwks(jwks_path, keyset["e1"], atomic=atomic)
    changed = time.monotonic()
    assert await _aio_refused_within(aio_stub, removed, WITHIN) == UNKNOWN_KEY
    assert time.monotonic() - changed <= WITHIN
    assert await _aio_echo(aio_stub, _bearer(kept)) == "jwt:alice"
    assert await _aio_echo(aio_stub, _bearer(signers.token("ES256", headers={"kid": "e1"}, sub="bob"))) == "jwt:bob"
    assert await _aio_refusal(aio_stub, _bearer(removed)) == UNKNOWN_KEY


async def test_duplicate_headers_and_echo_aio(aio_stub: Any, signers: Signers) -> None:
    good = _bearer(signers.token("RS256", headers={"kid": "r1"}))
    assert await _aio_echo(aio_stub, good) == "jwt:alice"
    assert await _aio_refusal(aio_stub, good + good) == "more than one authorization header"
    details = await _aio_refusal(aio_stub, _bearer(_hand_made({"alg": "RS256", "kid": EVIL})))
    assert details == UNKNOWN_KEY
