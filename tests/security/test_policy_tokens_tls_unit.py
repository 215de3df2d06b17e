"""Authorization rules, client token sources, TLS config: pure code, no sockets."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from rpcframe.errors import ConfigError
from rpcframe.security import (
    ANONYMOUS,
    AuthConfig,
    Identity,
    Policy,
    RefreshingToken,
    Rule,
    StaticToken,
    TLSConfig,
)
from rpcframe.security.guard import Authenticator
from rpcframe.security.tls import CertificateReloader, channel_credentials, server_credentials
from rpcframe.security.tokens import check_token_transport, token_parts
from tests.conftest import wait_until
from tests.security.conftest import Pki
from tests.security.test_auth_unit import FakeContext

ECHO = "/rpcframe.echo.v1.EchoService/Echo"
EXPAND = "/rpcframe.echo.v1.EchoService/Expand"
ALICE = Identity("alice", "jwt", scopes=frozenset({"echo:read"}), claims={"tenant": "t1"})
CERT = Identity("client.test", "mtls", "CN=client-cn", ("client.test", "spiffe-ish"))


# -- policy -----------------------------------------------------------------


def test_method_patterns() -> None:
    assert Rule(("*",)).covers(ECHO)
    assert Rule(("rpcframe.echo.v1.EchoService",)).covers(EXPAND)
    assert Rule(("rpcframe.echo.v1.EchoService/*",)).covers(EXPAND)
    assert Rule(("/rpcframe.echo.v1.EchoService/Echo",)).covers(ECHO)
    assert not Rule(("rpcframe.echo.v1.EchoService/Echo",)).covers(EXPAND)
    assert not Rule(("rpcframe.echo.v1.Other",)).covers(ECHO)
    with pytest.raises(ConfigError):
        Rule(())
    with pytest.raises(ConfigError):
        Rule(("pkg.Svc/Method/extra",))
    with pytest.raises(ConfigError):
        Rule(("pkg.Svc/",))


def test_rule_admission() -> None:
    assert Rule(("*",)).admits(ALICE)
    assert not Rule(("*",)).admits(ANONYMOUS)
    assert Rule(("*",), anonymous=True).admits(ANONYMOUS)
    assert Rule(("*",), principals=("alice",)).admits(ALICE)
    assert Rule(("*",), principals=("jwt:alice",)).admits(ALICE)
    assert not Rule(("*",), principals=("api_key:alice",)).admits(ALICE)
    assert Rule(("*",), principals=("mtls:spiffe-ish",)).admits(CERT)
    assert Rule(("*",), principals=("mtls:CN=client-cn",)).admits(CERT)
    assert Rule(("*",), scopes=("echo:read",)).admits(ALICE)
    assert not Rule(("*",), scopes=("echo:read", "echo:write")).admits(ALICE)
    assert Rule(("*",), claims=(("tenant", "t1"),)).admits(ALICE)
    assert not Rule(("*",), claims=(("tenant", "t2"),)).admits(ALICE)
    token_with_cert = ALICE.with_certificate(CERT)
    assert Rule(("*",), principals=("mtls:client.test",)).admits(token_with_cert)


def test_policy_resolves_rules_per_method() -> None:
    policy = Policy.from_mapping({"rpcframe.echo.v1.EchoService/Echo": ["alice"], "rpcframe.other.Svc": ["*"]})
    assert len(policy.rules_for(ECHO)) == 1
    assert policy.rules_for(EXPAND) == ()


def test_guard_statuses_and_audit_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rpcframe.audit")
    policy = Policy((Rule(("rpcframe.echo.v1.EchoService/Echo",), principals=("api_key:ci",)),))
    from rpcframe.security import ApiKeys

    auth = Authenticator(AuthConfig(api_keys=ApiKeys.from_plain({"ci": "k1", "other": "k2"}), policy=policy), None)
    echo, expand = auth.guard(ECHO), auth.guard(EXPAND)
    assert echo(FakeContext((("x-api-key", "k1"),))) is None
    assert echo(FakeContext((("x-api-key", "k2"),))) == (
        grpc.StatusCode.PERMISSION_DENIED, f"api_key:other may not call {ECHO}"
    )  # fmt: skip
    assert expand(FakeContext((("x-api-key", "k1"),)))[0] is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[index]
    assert echo(FakeContext())[0] is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[index]
    denied = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert denied == [
        f"denied method={ECHO} principal=api_key:other peer=ipv4:127.0.0.1:1234 reason=no rule admits the caller",
        f"denied method={EXPAND} principal=api_key:ci peer=ipv4:127.0.0.1:1234 reason=no rule covers the method",
    ]


# -- client tokens ----------------------------------------------------------


def test_static_tokens() -> None:
    assert StaticToken("abc").header() == ("authorization", "Bearer abc")
    assert StaticToken("k", scheme=None, key_name="x-api-key").header() == ("x-api-key", "k")
    assert token_parts("abc") == ((("authorization", "Bearer abc"),), None)
    with pytest.raises(ConfigError, match="must be a str"):
        token_parts(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        StaticToken("a\nb")
    with pytest.raises(ConfigError):
        StaticToken("a", key_name="Authorization")


def test_refreshing_token_fetches_once_then_refreshes_ahead() -> None:
    now = [1000.0]
    issued: list[str] = []

    def fetch() -> tuple[str, float]:
        issued.append(f"t{len(issued)}")
        return issued[-1], now[0] + 100

    token = RefreshingToken(fetch, refresh_before=10, clock=lambda: now[0])
    fixed, per_call = token_parts(token)
    assert fixed == ()
    assert per_call is not None
    assert [per_call() for _ in range(3)] == [("authorization", "Bearer t0")] * 3
    assert token.fetches == 1
    now[0] += 95  # inside the refresh window: served from cache while a thread fetches
    assert token.header() == ("authorization", "Bearer t0")
    wait_until(lambda: token.fetches == 2)
    assert token.header() == ("authorization", "Bearer t1")
    now[0] += 200  # expired: the call waits for a new one
    assert token.header() == ("authorization", "Bearer t2")


def test_refreshing_token_survives_a_failed_background_fetch(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    calls = [0]
    failed = threading.Event()

    def fetch() -> tuple[str, float]:
        calls[0] += 1
        if calls[0] == 2:
            failed.set()
            raise OSError("token endpoint down")
        return f"t{calls[0]}", now[0] + 100

    token = RefreshingToken(fetch, refresh_before=50, clock=lambda: now[0])
    assert token.header()[1] == "Bearer t1"
    now[0] = 60
    assert token.header()[1] == "Bearer t1"
    assert failed.wait(5)
    wait_until(lambda: not token._refreshing)
    assert token.header()[1] == "Bearer t1"  # the old token stays usable until it expires
    wait_until(lambda: token.fetches == 2)
    assert token.header()[1] == "Bearer t3"


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:1", "localhost:1", "[::1]:1", "127.0.0.1:1,127.0.0.2:2", "dns:///localhost:1", "unix:/tmp/s",
        ["127.0.0.1:1"],
    ],  # fmt: skip
)
def test_tokens_over_plaintext_to_loopback_are_fine(target: Any) -> None:
    check_token_transport(target, has_tls=False, allow_insecure=False)


@pytest.mark.parametrize(
    "target", ["10.0.0.1:1", "127.0.0.1:1,db.internal:2", "dns:///api.example.com:443", ["8.8.8.8:1"]]
)
def test_tokens_over_plaintext_to_remote_hosts_are_refused(target: Any) -> None:
    with pytest.raises(ConfigError, match="clear text"):
        check_token_transport(target, has_tls=False, allow_insecure=False)
    check_token_transport(target, has_tls=True, allow_insecure=False)
    check_token_transport(target, has_tls=False, allow_insecure=True)


def test_tokens_to_a_custom_resolver_need_tls() -> None:
    with pytest.raises(ConfigError, match="custom resolver"):
        check_token_transport(object(), has_tls=False, allow_insecure=False)


def test_tokens_to_etcd_discovered_endpoints_need_tls() -> None:
    # etcd on loopback says nothing about where the endpoints it lists are.
    with pytest.raises(ConfigError, match="discovered through etcd://127.0.0.1:2379/services/"):
        check_token_transport("etcd://127.0.0.1:2379/services/", has_tls=False, allow_insecure=False)
    check_token_transport("etcd://127.0.0.1:2379/services/", has_tls=True, allow_insecure=False)


# -- TLS config -------------------------------------------------------------


def test_tls_config_validation(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.server_files
    assert TLSConfig.for_server(cert, key, client_ca=pki.ca_pem).mutual
    assert not TLSConfig.for_server(cert, key).mutual
    assert TLSConfig.for_client(pki.ca_pem, server_name="x").channel_options() == (
        ("grpc.ssl_target_name_override", "x"),
    )
    with pytest.raises(ConfigError, match="cert and key go together"):
        TLSConfig(cert=cert)
    with pytest.raises(ConfigError, match="cannot read"):
        TLSConfig.for_client(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="not PEM"):
        TLSConfig.for_client(b"garbage")
    with pytest.raises(ConfigError, match="optional"):
        TLSConfig.for_server(cert, key, client_ca=pki.ca_pem).__class__(cert=cert, key=key, client_auth="optional")  # type: ignore[arg-type]


def test_server_tls_needs_a_certificate(pki: Pki) -> None:
    import rpcframe

    server = rpcframe.Server(rpcframe.ServerConfig(tls=TLSConfig.for_client(pki.ca_pem)))
    with pytest.raises(ConfigError, match="needs cert and key"):
        server.bind("127.0.0.1:0")
    server.stop(0)


def test_mismatched_key_is_refused(pki: Pki) -> None:
    other = pki.ca.issue_cert("other.test")
    tls = TLSConfig(cert=Pki.chain(pki.server), key=other.private_key_pem.bytes())
    with pytest.raises(ConfigError, match="does not belong"):
        server_credentials(tls)
    with pytest.raises(ConfigError, match="does not belong"):
        channel_credentials(tls)


def test_reloader_follows_files_and_skips_half_rotations(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(Pki.chain(pki.server))
    key.write_bytes(pki.server.private_key_pem.bytes())
    reloader = CertificateReloader(TLSConfig.for_server(cert, key))
    assert reloader.fetch() is None
    fresh: trustme.LeafCert = pki.ca.issue_cert("localhost", "127.0.0.1")
    cert.write_bytes(Pki.chain(fresh) + b"\n")  # new cert, old key: a rotation half done
    assert reloader.fetch() is None
    assert reloader.reloads == 0
    key.write_bytes(fresh.private_key_pem.bytes())
    assert reloader.fetch() is not None
    assert reloader.reloads == 1
    assert reloader.fetch() is None
