"""API keys, JWT verification and the authenticator: pure code, no sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import grpc
import pytest

from rpcframe.errors import ConfigError
from rpcframe.security import ApiKey, ApiKeys, AuthConfig, AuthError, JWTConfig, JWTKey, JWTVerifier, hash_api_key
from rpcframe.security.auth import JWKS_CHECK_INTERVAL
from rpcframe.security.guard import Authenticator
from rpcframe.security.identity import ANONYMOUS, Identity, mtls_names, peer, set_peer
from tests.conftest import wait_until
from tests.security.conftest import AUDIENCE, HS_SECRET, ISSUER, Signers, jwk, write_jwks


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_made(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token built without PyJWT, to craft what PyJWT refuses to sign."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 300}
    out.update(over)
    return out


@pytest.fixture
def verifier(signers: Signers) -> JWTVerifier:
    return JWTVerifier(
        JWTConfig(
            issuer=ISSUER,
            audience=AUDIENCE,
            keys=(JWTKey(signers.rsa_public, "RS256"), JWTKey(signers.ec_public, "ES256"), JWTKey(HS_SECRET, "HS256")),
            leeway=5,
        )
    )


def _refused(verifier: JWTVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    return info.value.message


# -- API keys ---------------------------------------------------------------


def test_api_keys_are_stored_hashed_and_verified() -> None:
    keys = ApiKeys.from_plain({"ci": "k-123456789", "ops": "k-987654321"}, scopes={"ops": ["admin"]})
    assert "k-123456789" not in repr(keys)
    assert keys.keys[0].digest == hash_api_key("k-123456789")
    who = keys.verify("k-987654321")
    assert (who.principal, who.method, who.scopes) == ("ops", "api_key", frozenset({"admin"}))
    with pytest.raises(AuthError, match="unknown API key"):
        keys.verify("k-12345678")


def test_api_key_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="digest"):
        ApiKey("ci", "plaintext-key")
    with pytest.raises(ConfigError, match="unique"):
        ApiKeys((ApiKey("a", hash_api_key("x")), ApiKey("a", hash_api_key("y"))))


# -- JWT --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_valid_tokens_of_each_algorithm(verifier: JWTVerifier, signers: Signers, alg: str) -> None:
    who = verifier.verify(signers.token(alg, scope="read write", role="admin"))
    assert (who.principal, who.method) == ("alice", "jwt")
    assert who.scopes == frozenset({"read", "write"})
    assert who.claims["role"] == "admin"


def test_scopes_from_a_list_claim(verifier: JWTVerifier, signers: Signers) -> None:
    assert verifier.verify(signers.token(scp=["a", "b"])).scopes == frozenset({"a", "b"})


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 60}, "JWT expired"),
        ({"nbf": int(time.time()) + 600}, "JWT not valid yet"),
        ({"aud": "someone-else"}, "JWT audience not accepted"),
        ({"iss": "https://evil.test"}, "JWT issuer not accepted"),
        ({"exp": None}, "lacks a required claim"),
        ({"sub": None}, "lacks a required claim"),
    ],
)
def test_bad_claims_are_refused_with_the_reason(
    verifier: JWTVerifier, signers: Signers, claims: dict[str, Any], reason: str
) -> None:
    assert reason in _refused(verifier, signers.token(**claims))


def test_leeway_allows_small_clock_skew(signers: Signers) -> None:
    token = signers.token(exp=int(time.time()) - 10)
    lenient = JWTVerifier(JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "RS256"),), leeway=30))
    strict = JWTVerifier(JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "RS256"),), leeway=0))
    assert lenient.verify(token).principal == "alice"
    assert "JWT expired" in _refused(strict, token)


def test_forged_signature_is_refused(verifier: JWTVerifier, signers: Signers) -> None:
    head, body, sig = signers.token("RS256").split(".")
    other = signers.token("RS256", sub="mallory").split(".")[1]
    assert "signature does not verify" in _refused(verifier, f"{head}.{other}.{sig}")
    assert "signature does not verify" in _refused(verifier, _hand_made({"alg": "HS256"}, _claims(), b"x" * 40))


def test_alg_none_is_refused(verifier: JWTVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        assert "'none' is not accepted" in _refused(verifier, _hand_made({"alg": alg}, _claims(), None))


def test_algorithm_confusion_is_refused(signers: Signers) -> None:
    # The attack: sign HS256 with the server's RSA *public* key as the secret.
    only_rsa = JWTVerifier(JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "RS256"),)))
    forged = _hand_made({"alg": "HS256", "typ": "JWT"}, _claims(), signers.rsa_public)
    assert "no HS256 key" in _refused(only_rsa, forged)
    rsa_only_alg = JWTVerifier(
        JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "RS256"),), algorithms=("RS256",))
    )
    assert _refused(rsa_only_alg, forged) == "JWT algorithm not accepted (use RS256)"
    # Binding a PEM public key as an HS256 secret is refused by configuration.
    with pytest.raises(ConfigError):
        JWTVerifier(JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "HS256"),)))


def test_malformed_tokens(verifier: JWTVerifier) -> None:
    assert _refused(verifier, "not-a-jwt") == "malformed JWT"
    assert _refused(verifier, "a.b.c") == "malformed JWT"


def test_verification_is_cached_until_expiry(signers: Signers) -> None:
    now = [time.time()]
    config = JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "RS256"),), leeway=0)
    v = JWTVerifier(config, clock=lambda: now[0])
    token = signers.token(exp=int(now[0]) + 100)
    for _ in range(5):
        assert v.verify(token).principal == "alice"
    assert v.verifications == 1
    now[0] += 101  # past exp on the injected clock: the cached result is dropped
    v.verify(token)  # PyJWT itself still sees a valid token on the real clock
    assert v.verifications == 2


def test_cache_is_bounded(signers: Signers) -> None:
    v = JWTVerifier(JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(HS_SECRET, "HS256"),), cache_size=3))
    tokens = [signers.token("HS256", sub=f"u{i}") for i in range(5)]
    for t in tokens:
        v.verify(t)
    assert len(v._cache) == 3
    v.verify(tokens[0])
    assert v.verifications == 6


def test_jwks_file_with_kids_and_reload(signers: Signers, tmp_path: Any) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(signers.rsa_public, "r1", "RS256")]}))
    v = JWTVerifier(JWTConfig(ISSUER, AUDIENCE, jwks_file=path))
    assert v.verify(signers.token("RS256", headers={"kid": "r1"})).principal == "alice"
    assert _refused(v, signers.token("ES256", headers={"kid": "e1"})) == "JWT signed by an unknown key"
    keys = [jwk(signers.rsa_public, "r1", "RS256"), jwk(signers.ec_public, "e1", "ES256")]
    path.write_text(json.dumps({"keys": keys}, indent=1))  # a new key id: re-read on first use
    assert v.verify(signers.token("ES256", headers={"kid": "e1"})).principal == "alice"
    assert _refused(v, signers.token("RS256", headers={"kid": "e1"})) == "JWT signed by an unknown key"


def test_jwt_config_is_validated(signers: Signers) -> None:
    with pytest.raises(ConfigError, match="issuer and audience"):
        JWTConfig("", AUDIENCE, keys=(JWTKey(HS_SECRET, "HS256"),))
    with pytest.raises(ConfigError, match="keys or jwks_file"):
        JWTConfig(ISSUER, AUDIENCE)
    with pytest.raises(ConfigError, match="algorithms"):
        JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(HS_SECRET, "HS256"),), algorithms=("none",))
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        JWTKey(b"short", "HS256")
    with pytest.raises(ConfigError, match="algorithm"):
        JWTKey(signers.rsa_public, "PS512")


# -- authenticator (metadata + transport -> identity) ------------------------


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), auth: dict[str, list[bytes]] | None = None) -> None:
        self._metadata = metadata
        self._auth = auth or {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1234"


_CERT = {
    "x509_subject": [b"CN=client-cn,O=test"],
    "x509_common_name": [b"client-cn"],
    "x509_subject_alternative_name": [b"client.test", b"svc@client.test"],
}


def test_mtls_names_from_auth_context() -> None:
    who = mtls_names(_CERT)
    assert who is not None
    assert (who.principal, who.method, who.subject) == ("client.test", "mtls", "CN=client-cn,O=test")
    assert "mtls:svc@client.test" in who.names()
    assert mtls_names({"transport_security_type": [b"insecure"]}) is None


def test_authenticator_picks_the_credential(signers: Signers) -> None:
    auth = Authenticator(
        AuthConfig(
            jwt=JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "RS256"),)),
            api_keys=ApiKeys.from_plain({"ci": "key-1"}),
        ),
        None,
    )
    token = signers.token()
    assert auth.authenticate((("authorization", f"Bearer {token}"),), FakeContext()).method == "jwt"
    assert auth.authenticate((("x-api-key", "key-1"),), FakeContext()).principal == "ci"
    assert auth.authenticate((("authorization", "ApiKey key-1"),), FakeContext()).principal == "ci"
    for metadata, reason in [
        ((), "missing credentials: send 'authorization: Bearer <JWT>' or 'x-api-key: <key>'"),
        ((("authorization", "Basic dXNlcg=="),), "authorization scheme not accepted (use Bearer or ApiKey)"),
        ((("authorization", "Bearer"),), "malformed authorization header: expected '<scheme> <credential>'"),
        ((("x-api-key", "nope"),), "unknown API key"),
    ]:
        with pytest.raises(AuthError) as info:
            auth.authenticate(metadata, FakeContext())
        assert info.value.message == reason


def test_authenticator_with_mtls_and_anonymous(pki: Any) -> None:
    from rpcframe.security import TLSConfig

    tls = TLSConfig.for_server(*pki.server_files, client_ca=pki.ca_pem)
    auth = Authenticator(AuthConfig(mtls=True), tls)
    assert auth.authenticate((), FakeContext(auth=_CERT)).principal == "client.test"
    with pytest.raises(AuthError, match="a client certificate"):
        auth.authenticate((), FakeContext())
    anon = Authenticator(AuthConfig(mtls=False, allow_anonymous=True), None)
    assert anon.authenticate((), FakeContext()) is ANONYMOUS
    with pytest.raises(AuthError, match="API keys are not accepted"):
        anon.authenticate((("x-api-key", "k"),), FakeContext())
    with pytest.raises(ConfigError):
        AuthConfig(mtls=False)


def test_peer_only_trusts_its_own_call() -> None:
    mine, other = FakeContext(), FakeContext(auth=_CERT)
    set_peer(mine, Identity("alice", "jwt"))
    assert peer(mine).principal == "alice"
    assert peer(other).principal == "client.test"  # a stale value of another call is ignored
    assert peer(FakeContext()) is ANONYMOUS


def test_two_credential_headers_of_one_kind_are_refused(signers: Signers) -> None:
    auth = Authenticator(
        AuthConfig(
            jwt=JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "RS256"),)),
            api_keys=ApiKeys.from_plain({"ci": "key-1", "ops": "key-2"}),
        ),
        None,
    )
    bearer = ("authorization", f"Bearer {signers.token()}")
    for metadata, reason in [
        ((bearer, bearer), "more than one authorization header"),
        ((bearer, ("authorization", "ApiKey key-1")), "more than one authorization header"),
        ((("x-api-key", "key-1"), ("x-api-key", "key-2")), "more than one x-api-key header"),
        ((("x-api-key", "key-1"), ("x-api-key", "key-1")), "more than one x-api-key header"),
    ]:
        with pytest.raises(AuthError) as info:
            auth.authenticate(metadata, FakeContext())
        assert (info.value.code, info.value.message) == (grpc.StatusCode.UNAUTHENTICATED, reason)
    # One of each kind is fine (the authorization header is the one used).
    assert auth.authenticate((bearer, ("x-api-key", "key-2")), FakeContext()).principal == "alice"


def test_refusals_quote_nothing_from_the_token(verifier: JWTVerifier, signers: Signers) -> None:
    evil = "evil-kid-<script>"
    with_kid = JWTVerifier(JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey(signers.rsa_public, "RS256", kid="r1"),)))
    assert _refused(with_kid, signers.token("RS256", headers={"kid": evil})) == "JWT signed by an unknown key"
    assert _refused(verifier, _hand_made({"alg": evil}, _claims(), None)) == (
        "JWT algorithm not accepted (use HS256, RS256, ES256)"
    )
    assert _refused(verifier, _hand_made({"typ": "JWT"}, _claims(), None)) == "malformed JWT: no algorithm"
    # PyJWT's own texts are not passed on (some quote the token).
    assert _refused(verifier, signers.token(sub=None)) == "JWT lacks a required claim: 'sub'"
    assert _refused(verifier, signers.token(iat=evil)) == "JWT issued-at (iat) claim is not an integer"
    assert _refused(verifier, signers.token(exp=evil)) == "malformed JWT"


@pytest.fixture
def jwks_verifier(signers: Signers, tmp_path: Any) -> tuple[JWTVerifier, Any]:
    """A verifier of a JWKS file holding r1 (RS256) and e1 (ES256), and the file."""
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk(signers.rsa_public, "r1", "RS256"), jwk(signers.ec_public, "e1", "ES256"))
    return JWTVerifier(JWTConfig(ISSUER, AUDIENCE, jwks_file=path)), path


def _check_now(v: JWTVerifier) -> None:
    """Run the file check a call would run once the check interval has passed."""
    assert v._jwks is not None
    v._jwks.poll(time.monotonic(), force=True)


def test_a_removed_key_drops_its_cached_tokens(jwks_verifier: tuple[JWTVerifier, Any], signers: Signers) -> None:
    v, path = jwks_verifier
    r1, e1 = signers.token("RS256", headers={"kid": "r1"}), signers.token("ES256", headers={"kid": "e1"})
    for token in (r1, e1, r1, e1):
        assert v.verify(token).principal == "alice"
    assert v.verifications == 2
    write_jwks(path, jwk(signers.ec_public, "e1", "ES256"))
    _check_now(v)
    assert _refused(v, r1) == "JWT signed by an unknown key"
    assert v.verify(e1).principal == "alice"  # verified again once: the whole cache was dropped
    assert v.verifications == 3


def test_a_verification_racing_the_removal_is_not_trusted(
    jwks_verifier: tuple[JWTVerifier, Any], signers: Signers
) -> None:
    v, path = jwks_verifier
    r1 = signers.token("RS256", headers={"kid": "r1"})
    identity = v.verify(r1)
    stale = v._cache[r1]  # what a call verifying with the old keys would store after the change
    write_jwks(path, jwk(signers.ec_public, "e1", "ES256"))
    _check_now(v)
    v._cache[r1] = stale
    assert stale[0] is identity
    assert _refused(v, r1) == "JWT signed by an unknown key"


def test_added_keys_and_touches_keep_the_cache(jwks_verifier: tuple[JWTVerifier, Any], signers: Signers) -> None:
    v, path = jwks_verifier
    r1 = signers.token("RS256", headers={"kid": "r1"})
    v.verify(r1)
    keys = [jwk(signers.rsa_public, "r1", "RS256"), jwk(signers.ec_public, "e1", "ES256")]
    write_jwks(path, *keys, jwk(HS_SECRET, "h1", "HS256"))
    _check_now(v)
    assert v.verify(signers.token("HS256", headers={"kid": "h1"})).principal == "alice"
    write_jwks(path, *reversed(keys), jwk(HS_SECRET, "h1", "HS256"))  # same keys, new file
    _check_now(v)
    v.verify(r1)
    assert v.verifications == 2  # r1 once, the HS256 token once: nothing removed, nothing re-verified


def test_a_broken_or_missing_file_keeps_the_last_good_keys(
    jwks_verifier: tuple[JWTVerifier, Any], signers: Signers, caplog: pytest.LogCaptureFixture
) -> None:
    v, path = jwks_verifier
    r1, e1 = signers.token("RS256", headers={"kid": "r1"}), signers.token("ES256", headers={"kid": "e1"})
    write_jwks(path, jwk(signers.ec_public, "e1", "ES256"))
    _check_now(v)
    caplog.set_level(logging.WARNING, logger="rpcframe.security")
    for broken in ('{"keys": [', '{"keys": {}}', '{"keys": [{"kty": "nope"}]}'):
        path.write_text(broken)
        for _ in range(3):
            _check_now(v)
            assert _refused(v, r1) == "JWT signed by an unknown key"  # never re-admitted
            assert v.verify(e1).principal == "alice"  # the last good set stays
    path.unlink()
    for _ in range(3):
        _check_now(v)
        assert v.verify(e1).principal == "alice"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4, warnings  # once per broken version, once for the missing file
    assert all("keeping the last good key set" in w for w in warnings)
    write_jwks(path)  # an empty set is valid: every key of the file is revoked
    _check_now(v)
    assert _refused(v, e1) == "JWT signed by an unknown key"


def test_jwks_changes_are_checked_at_most_every_half_second(
    jwks_verifier: tuple[JWTVerifier, Any], signers: Signers
) -> None:
    v, path = jwks_verifier
    r1 = signers.token("RS256", headers={"kid": "r1"})
    v.verify(r1)
    write_jwks(path, jwk(signers.ec_public, "e1", "ES256"))
    changed = time.monotonic()
    wait_until(lambda: _verifies(v, r1) is False, timeout=1.0, interval=0.01)
    assert time.monotonic() - changed <= 1.0
    assert v._jwks is not None
    assert v._jwks.next_check - time.monotonic() <= JWKS_CHECK_INTERVAL


def _verifies(v: JWTVerifier, token: str) -> bool:
    try:
        v.verify(token)
    except AuthError:
        return False
    return True
