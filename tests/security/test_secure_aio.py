"""TLS, mTLS, tokens and authorization end to end on the asyncio server and client."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trustme

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.security import AuthConfig, Policy, Rule, TLSConfig
from tests.security.conftest import Pki, Signers, client_tls, jwt_config, server_tls
from tests.security.servers import ECHO, EXPAND, serve_aio
from tests.security.test_auth_unit import _claims, _hand_made

EchoStub = echo_pb2_grpc.EchoServiceStub
TIMEOUT = 5.0


@pytest.fixture
async def aio_target(pki: Pki, signers: Signers) -> AsyncIterator[str]:
    """asyncio server with mTLS + JWT; Echo needs scope echo, Expand alice, Collect/Chat any authenticated."""
    policy = Policy(
        (
            Rule((ECHO,), scopes=("echo",)),
            Rule((EXPAND,), principals=("jwt:alice",)),
            Rule(("rpcframe.echo.v1.EchoService/Collect", "rpcframe.echo.v1.EchoService/Chat")),
        )
    )
    server, target = await serve_aio(
        rpcframe.ServerConfig(tls=server_tls(pki), auth=AuthConfig(jwt=jwt_config(signers), policy=policy))
    )
    yield target
    await server.stop(0)


def _connect(target: str, tls: TLSConfig | None, **config: Any) -> rpcframe.aio.Channel:
    return rpcframe.aio.connect(target, rpcframe.ChannelConfig(tls=tls, default_timeout=TIMEOUT, **config))


async def _requests(*messages: str) -> AsyncIterator[pb.EchoRequest]:
    for m in messages:
        yield pb.EchoRequest(message=m)


async def test_permitted_calls_of_every_kind(aio_target: str, pki: Pki, signers: Signers) -> None:
    async with _connect(aio_target, client_tls(pki), token=signers.token(scope="echo")) as channel:
        stub = channel.stub(EchoStub)
        assert (await stub.Echo(pb.EchoRequest())).message == "jwt:alice"
        assert [r.message async for r in stub.Expand(pb.ExpandRequest(count=2))] == ["jwt:alice"] * 2
        assert (await stub.Collect(_requests("a", "b"))).count == 2
        assert [r.message async for r in stub.Chat(_requests("x"))] == ["x:jwt:alice"]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "missing credentials: send 'authorization: Bearer <JWT>'"),
        ("forged", "JWT signature does not verify"),
        ("expired", "JWT expired"),
        ("wrong audience", "JWT audience not accepted"),
        ("wrong issuer", "JWT issuer not accepted"),
        ("alg none", "JWT algorithm 'none' is not accepted"),
    ],
)
async def test_bad_tokens_are_unauthenticated(signers: Signers, kind: str, reason: str) -> None:
    # No mTLS here, so a call without a token has no identity at all.
    server, target = await serve_aio(rpcframe.ServerConfig(auth=AuthConfig(jwt=jwt_config(signers))))
    token = {
        "missing": None,
        "forged": _hand_made({"alg": "HS256"}, _claims(), b"not-the-server-secret-0123456789ab"),
        "expired": signers.token(exp=int(time.time()) - 3600),
        "wrong audience": signers.token(aud="another-service"),
        "wrong issuer": signers.token(iss="https://evil.test"),
        "alg none": _hand_made({"alg": "none"}, _claims(), None),
    }[kind]
    try:
        async with _connect(target, None, token=token) as channel:
            stub = channel.stub(EchoStub)
            with pytest.raises(rpcframe.Unauthenticated) as info:
                await stub.Echo(pb.EchoRequest())
            assert info.value.details() == reason
            with pytest.raises(rpcframe.Unauthenticated) as info:
                [r async for r in stub.Expand(pb.ExpandRequest(count=1))]
            assert info.value.details() == reason
            assert server.inflight == 0
    finally:
        await server.stop(0)


async def test_valid_token_without_permission_is_denied(
    aio_target: str, pki: Pki, signers: Signers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rpcframe.audit")
    async with _connect(aio_target, client_tls(pki), token=signers.token(sub="bob")) as channel:
        stub = channel.stub(EchoStub)
        with pytest.raises(rpcframe.PermissionDenied, match=f"jwt:bob may not call {ECHO}"):
            await stub.Echo(pb.EchoRequest())
        with pytest.raises(rpcframe.PermissionDenied, match=f"jwt:bob may not call {EXPAND}"):
            [r async for r in stub.Expand(pb.ExpandRequest(count=1))]
        assert (await stub.Collect(_requests("a"))).message == "jwt:bob"  # and the server keeps serving
    denied = [r.getMessage() for r in caplog.records if r.name == "rpcframe.audit" and r.levelno == logging.WARNING]
    assert [line.split(" peer=")[0] for line in denied] == [
        f"denied method={ECHO} principal=jwt:bob",
        f"denied method={EXPAND} principal=jwt:bob",
    ]


async def test_mtls_identity_without_token(aio_target: str, pki: Pki) -> None:
    async with _connect(aio_target, client_tls(pki)) as channel:
        assert (await channel.stub(EchoStub).Collect(_requests("a"))).message == "mtls:client.test"


@pytest.mark.parametrize("case", ["no client certificate", "wrong CA", "wrong hostname"])
async def test_bad_certificates_fail_the_connection(aio_target: str, pki: Pki, case: str) -> None:
    client = {
        "no client certificate": client_tls(pki, cert=False),
        "wrong CA": client_tls(pki, ca=trustme.CA().cert_pem.bytes()),
        "wrong hostname": client_tls(pki, server_name="elsewhere.test"),
    }[case]
    async with _connect(aio_target, client) as channel:
        started = time.monotonic()
        with pytest.raises(rpcframe.Unavailable):
            await channel.stub(EchoStub).Echo(pb.EchoRequest())
        assert time.monotonic() - started < TIMEOUT
    async with _connect(aio_target, client_tls(pki)) as channel:  # still serving good clients
        assert (await channel.stub(EchoStub).Collect(_requests("a"))).count == 1


async def test_certificate_rotation_without_restart(pki: Pki, tmp_path: Any) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(Pki.chain(pki.server))
    key.write_bytes(pki.server.private_key_pem.bytes())
    server, target = await serve_aio(rpcframe.ServerConfig(tls=TLSConfig.for_server(cert, key)))
    try:
        async with _connect(target, TLSConfig.for_client(pki.ca_pem)) as channel:
            assert (await channel.stub(EchoStub).Echo(pb.EchoRequest())).message == "none:None"
        new_ca = trustme.CA()
        fresh = new_ca.issue_cert("localhost", "127.0.0.1")
        key.write_bytes(fresh.private_key_pem.bytes())
        cert.write_bytes(Pki.chain(fresh))
        async with _connect(target, TLSConfig.for_client(new_ca.cert_pem.bytes())) as channel:
            assert (await channel.stub(EchoStub).Echo(pb.EchoRequest())).message == "none:None"
        async with _connect(target, TLSConfig.for_client(pki.ca_pem)) as channel:
            with pytest.raises(rpcframe.Unavailable):
                await channel.stub(EchoStub).Echo(pb.EchoRequest())
    finally:
        await server.stop(0)
