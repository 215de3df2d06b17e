"""TLS, mTLS, tokens and authorization end to end on the thread-pool server and client."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.security import ApiKeys, AuthConfig, Policy, RefreshingToken, Rule, StaticToken, TLSConfig
from tests.security.conftest import Pki, Signers, client_tls, jwt_config, server_tls
from tests.security.servers import ECHO, EXPAND, serve_sync
from tests.security.test_auth_unit import _claims, _hand_made

EchoStub = echo_pb2_grpc.EchoServiceStub
TIMEOUT = 5.0


@pytest.fixture
def mtls_jwt_server(pki: Pki, signers: Signers) -> Iterator[str]:
    """mTLS + JWT; Echo needs scope echo, Expand is for alice only, Collect/Chat for anyone authenticated."""
    policy = Policy(
        (
            Rule((ECHO,), scopes=("echo",)),
            Rule((EXPAND,), principals=("jwt:alice",)),
            Rule(("rpcframe.echo.v1.EchoService/Collect", "rpcframe.echo.v1.EchoService/Chat")),
        )
    )
    auth = AuthConfig(jwt=jwt_config(signers), policy=policy)
    server, target = serve_sync(rpcframe.ServerConfig(tls=server_tls(pki), auth=auth, grace_period=1))
    yield target
    server.stop(0)


def _connect(target: str, tls: TLSConfig | None = None, **config: Any) -> rpcframe.Channel:
    return rpcframe.connect(target, rpcframe.ChannelConfig(tls=tls, default_timeout=TIMEOUT, **config))


def _echo(channel: rpcframe.Channel) -> str:
    return str(channel.stub(EchoStub).Echo(pb.EchoRequest(message="hi")).message)


def test_tls_without_auth_serves_every_call_kind(pki: Pki) -> None:
    server, target = serve_sync(rpcframe.ServerConfig(tls=server_tls(pki, mutual=False)))
    try:
        with _connect(target, client_tls(pki, cert=False)) as channel:
            stub = channel.stub(EchoStub)
            assert stub.Echo(pb.EchoRequest(message="hi")).message == "none:None"
            assert [r.index for r in stub.Expand(pb.ExpandRequest(count=3))] == [0, 1, 2]
            assert stub.Collect(iter([pb.EchoRequest(), pb.EchoRequest()])).count == 2
            assert [r.message for r in stub.Chat(iter([pb.EchoRequest(message="a")]))] == ["a:none:None"]
    finally:
        server.stop(0)


def test_plaintext_client_cannot_talk_to_a_tls_server(pki: Pki) -> None:
    server, target = serve_sync(rpcframe.ServerConfig(tls=server_tls(pki, mutual=False)))
    try:
        with _connect(target) as channel, pytest.raises(rpcframe.Unavailable):
            _echo(channel)
    finally:
        server.stop(0)


def test_mtls_identity_reaches_the_handler(pki: Pki) -> None:
    server, target = serve_sync(rpcframe.ServerConfig(tls=server_tls(pki), auth=AuthConfig(mtls=True)))
    try:
        with _connect(target, client_tls(pki)) as channel:
            assert _echo(channel) == "mtls:client.test"
            assert [r.message for r in channel.stub(EchoStub).Expand(pb.ExpandRequest(count=2))] == [
                "mtls:client.test"
            ] * 2
    finally:
        server.stop(0)


def test_mtls_without_auth_config_still_tells_handlers_the_peer(pki: Pki) -> None:
    server, target = serve_sync(rpcframe.ServerConfig(tls=server_tls(pki)))
    try:
        with _connect(target, client_tls(pki)) as channel:
            assert _echo(channel) == "mtls:client.test"
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no client certificate", ""),
        ("wrong CA", "CERTIFICATE_VERIFY_FAILED"),
        ("wrong hostname", "Hostname Verification"),
        ("expired server certificate", "CERTIFICATE_VERIFY_FAILED"),
        ("expired client certificate", ""),
    ],
)
def test_bad_certificates_fail_the_connection(pki: Pki, tmp_path: Path, case: str, needle: str) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    tls = server_tls(pki)
    client = client_tls(pki)
    if case == "no client certificate":
        client = client_tls(pki, cert=False)
    elif case == "wrong CA":
        client = client_tls(pki, ca=trustme.CA().cert_pem.bytes())
    elif case == "wrong hostname":
        client = client_tls(pki, server_name="elsewhere.test")
    elif case == "expired server certificate":
        stale = pki.ca.issue_cert("localhost", "127.0.0.1", not_before=old, not_after=past)
        tls = TLSConfig.for_server(Pki.chain(stale), stale.private_key_pem.bytes(), client_ca=pki.ca_pem)
    else:
        stale = pki.ca.issue_cert("client.test", not_before=old, not_after=past)
        client = TLSConfig.for_client(pki.ca_pem, cert=Pki.chain(stale), key=stale.private_key_pem.bytes())
    server, target = serve_sync(rpcframe.ServerConfig(tls=tls, auth=AuthConfig(mtls=True)))
    try:
        with _connect(target, client) as channel:
            started = time.monotonic()
            with pytest.raises(rpcframe.Unavailable) as info:
                _echo(channel)
            assert time.monotonic() - started < TIMEOUT  # fails fast, does not wait out the deadline
            # grpc's handshake error when the call met it; the balancer's summary
            # when the endpoint was already known to be failing.
            details = info.value.details()
            assert needle in details or "TRANSIENT_FAILURE" in details
        # The server is unharmed and keeps serving good clients.
        if case not in ("expired server certificate",):
            with _connect(target, client_tls(pki)) as channel:
                assert _echo(channel) == "mtls:client.test"
    finally:
        server.stop(0)


def _token_call(target: str, pki: Pki, token: str | None, method: str = "echo") -> str:
    with _connect(target, client_tls(pki), token=token) as channel:
        stub = channel.stub(EchoStub)
        if method == "expand":
            return ",".join(r.message for r in stub.Expand(pb.ExpandRequest(count=2)))
        return str(stub.Echo(pb.EchoRequest(message="hi")).message)


def test_valid_token_with_permission_is_ok(mtls_jwt_server: str, pki: Pki, signers: Signers) -> None:
    assert _token_call(mtls_jwt_server, pki, signers.token(scope="echo")) == "jwt:alice"
    assert _token_call(mtls_jwt_server, pki, signers.token("ES256"), "expand") == "jwt:alice,jwt:alice"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("forged", "JWT signature does not verify"),
        ("expired", "JWT expired"),
        ("wrong audience", "JWT audience not accepted"),
        ("wrong issuer", "JWT issuer not accepted"),
        ("alg none", "JWT algorithm 'none' is not accepted"),
        ("garbage", "malformed JWT"),
    ],
)
def test_bad_tokens_are_unauthenticated(
    mtls_jwt_server: str, pki: Pki, signers: Signers, kind: str, reason: str
) -> None:
    token = {
        "forged": _hand_made({"alg": "HS256"}, _claims(scope="echo"), b"not-the-server-secret-0123456789ab"),
        "expired": signers.token(scope="echo", exp=int(time.time()) - 3600),
        "wrong audience": signers.token(scope="echo", aud="another-service"),
        "wrong issuer": signers.token(scope="echo", iss="https://evil.test"),
        "alg none": _hand_made({"alg": "none"}, _claims(scope="echo"), None),
        "garbage": "not.a.jwt",
    }[kind]
    for method in ("echo", "expand"):
        with pytest.raises(rpcframe.Unauthenticated) as info:
            _token_call(mtls_jwt_server, pki, token, method)
        assert info.value.details() == reason


def test_missing_token_with_mtls_falls_back_to_the_certificate(mtls_jwt_server: str, pki: Pki) -> None:
    # The client certificate authenticates; Collect admits any authenticated caller, Echo needs a scope.
    with _connect(mtls_jwt_server, client_tls(pki)) as channel:
        assert channel.stub(EchoStub).Collect(iter([pb.EchoRequest()])).message == "mtls:client.test"
    with pytest.raises(rpcframe.PermissionDenied, match=f"mtls:client.test may not call {ECHO}"):
        _token_call(mtls_jwt_server, pki, None)
    with pytest.raises(rpcframe.PermissionDenied, match=f"mtls:client.test may not call {EXPAND}"):
        _token_call(mtls_jwt_server, pki, None, "expand")


def test_missing_token_is_unauthenticated(signers: Signers) -> None:
    server, target = serve_sync(rpcframe.ServerConfig(auth=AuthConfig(jwt=jwt_config(signers))))
    try:
        with _connect(target) as channel, pytest.raises(rpcframe.Unauthenticated) as info:
            _echo(channel)
        assert info.value.details() == "missing credentials: send 'authorization: Bearer <JWT>'"
    finally:
        server.stop(0)


def test_valid_token_without_permission_is_denied_and_audited(
    mtls_jwt_server: str, pki: Pki, signers: Signers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rpcframe.audit")
    with pytest.raises(rpcframe.PermissionDenied) as info:
        _token_call(mtls_jwt_server, pki, signers.token(sub="bob", scope="other"))
    assert info.value.details() == f"jwt:bob may not call {ECHO}"
    with pytest.raises(rpcframe.PermissionDenied):
        _token_call(mtls_jwt_server, pki, signers.token(sub="bob"), "expand")
    lines = [r.getMessage() for r in caplog.records if r.name == "rpcframe.audit" and r.levelno == logging.WARNING]
    assert len(lines) == 2
    assert lines[0].startswith(f"denied method={ECHO} principal=jwt:bob peer=ipv")
    assert lines[0].endswith("reason=no rule admits the caller")


def test_client_and_bidi_streams_are_checked_too(mtls_jwt_server: str, pki: Pki, signers: Signers) -> None:
    with _connect(mtls_jwt_server, client_tls(pki), token=signers.token(sub="carol")) as channel:
        stub = channel.stub(EchoStub)
        assert stub.Collect(iter([pb.EchoRequest()] * 3)).message == "jwt:carol"
        assert [r.message for r in stub.Chat(iter([pb.EchoRequest(message="x")]))] == ["x:jwt:carol"]
    with _connect(mtls_jwt_server, client_tls(pki), token="forged.token.here") as channel:
        with pytest.raises(rpcframe.Unauthenticated):
            channel.stub(EchoStub).Collect(iter([pb.EchoRequest()]))
        with pytest.raises(rpcframe.Unauthenticated):
            list(channel.stub(EchoStub).Chat(iter([pb.EchoRequest()])))


def test_a_steady_client_pays_the_signature_check_once(pki: Pki, signers: Signers) -> None:
    server, target = serve_sync(rpcframe.ServerConfig(auth=AuthConfig(jwt=jwt_config(signers))))
    try:
        with _connect(target, token=signers.token()) as channel:
            for _ in range(20):
                assert _echo(channel) == "jwt:alice"
        assert server._auth.jwt.verifications == 1  # type: ignore[attr-defined]
    finally:
        server.stop(0)


def test_api_keys_end_to_end() -> None:
    keys = ApiKeys.from_plain({"ci-bot": "k-0123456789abcdef"})
    policy = Policy((Rule((ECHO,), principals=("api_key:ci-bot",)),))
    server, target = serve_sync(rpcframe.ServerConfig(auth=AuthConfig(api_keys=keys, policy=policy)))
    try:
        api_key = StaticToken("k-0123456789abcdef", scheme=None, key_name="x-api-key")
        with _connect(target, token=api_key) as channel:
            assert _echo(channel) == "api_key:ci-bot"
            with pytest.raises(rpcframe.PermissionDenied):
                list(channel.stub(EchoStub).Expand(pb.ExpandRequest(count=1)))
        with _connect(target, token=StaticToken("wrong-key", scheme=None, key_name="x-api-key")) as channel:
            with pytest.raises(rpcframe.Unauthenticated, match="unknown API key"):
                _echo(channel)
    finally:
        server.stop(0)


def test_refreshing_token_end_to_end(signers: Signers) -> None:
    server, target = serve_sync(rpcframe.ServerConfig(auth=AuthConfig(jwt=jwt_config(signers))))
    issued: list[str] = []

    def fetch() -> tuple[str, float]:
        issued.append(signers.token(sub=f"svc{len(issued)}"))
        return issued[-1], time.time() + 300

    try:
        with _connect(target, token=RefreshingToken(fetch, refresh_before=10)) as channel:
            assert [_echo(channel) for _ in range(3)] == ["jwt:svc0"] * 3
        assert len(issued) == 1
    finally:
        server.stop(0)


def test_tokens_over_plaintext_are_refused_unless_local_or_opted_in() -> None:
    # 0.0.0.0 is not loopback to the check, yet nothing sent to it leaves the machine,
    # should the refusal ever break.
    with pytest.raises(rpcframe.ConfigError, match="clear text"):
        rpcframe.connect("0.0.0.0:50051", rpcframe.ChannelConfig(token="secret"))
    rpcframe.connect("0.0.0.0:50051", rpcframe.ChannelConfig(token="secret", allow_insecure_token=True)).close()
    rpcframe.connect("127.0.0.1:50051", rpcframe.ChannelConfig(token="secret")).close()


def test_certificate_rotation_without_restart(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(Pki.chain(pki.server))
    key.write_bytes(pki.server.private_key_pem.bytes())
    server, target = serve_sync(rpcframe.ServerConfig(tls=TLSConfig.for_server(cert, key)))
    try:
        with _connect(target, TLSConfig.for_client(pki.ca_pem)) as old_client:
            assert _echo(old_client) == "none:None"
            new_ca = trustme.CA()
            fresh = new_ca.issue_cert("localhost", "127.0.0.1")
            key.write_bytes(fresh.private_key_pem.bytes())
            cert.write_bytes(Pki.chain(fresh))
            # New connections get the new certificate: a client trusting only the new CA gets in ...
            with _connect(target, TLSConfig.for_client(new_ca.cert_pem.bytes())) as new_client:
                assert _echo(new_client) == "none:None"
            # ... one trusting only the old CA no longer does ...
            with _connect(target, TLSConfig.for_client(pki.ca_pem)) as stale, pytest.raises(rpcframe.Unavailable):
                _echo(stale)
            # ... and the connection made before the rotation keeps working.
            assert _echo(old_client) == "none:None"
    finally:
        server.stop(0)
