"""Server-side authentication: API keys and JWT bearer tokens.

Everything here is pure (no grpc): it takes the token a call presented and
returns an :class:`~rpcframe.security.identity.Identity` or raises
:class:`AuthError` with the status and a precise message. The server's
per-call wrapper (see :mod:`rpcframe.security.guard`) drives it.

API keys are stored as SHA-256 digests, never in clear, and a presented key
is compared with every stored digest using :func:`hmac.compare_digest`. A
plain hash (not a slow KDF) is right here because API keys are long random
strings, not passwords: there is nothing to brute-force.

JWTs are verified with PyJWT. Each configured key is bound to exactly one
algorithm, and a token is only ever checked with a key of the algorithm its
header names, from the accepted list; so ``alg: none`` and algorithm
confusion (an RS256 public key used as an HS256 secret) are refused before
any signature code runs. Issuer, audience, subject and expiry are required.
A verified token is cached until it expires, so a steady client pays for the
signature check once, not per call.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import jwt

from ..errors import ConfigError
from .authz import Policy
from .identity import Identity

__all__ = [
    "ApiKey",
    "ApiKeys",
    "AuthConfig",
    "AuthError",
    "JWTConfig",
    "JWTKey",
    "JWTVerifier",
    "hash_api_key",
]

_LOG = logging.getLogger("rpcframe.security")

#: Algorithms rpcframe verifies; each key is bound to one of them.
SUPPORTED_ALGORITHMS = ("HS256", "RS256", "ES256")


class AuthError(Exception):
    """A call's credentials were refused: the status and message it ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unauthenticated(message: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message)


# -- API keys ---------------------------------------------------------------


def hash_api_key(key: str) -> str:
    """The stored form of an API key: ``"sha256:<hex digest>"``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key as the server stores it: a name, the key's digest, its scopes.

    Attributes:
        name: the principal a call with this key runs as.
        digest: :func:`hash_api_key` of the key (never the key itself).
        scopes: scopes the key grants (matched by authorization rules).
    """

    name: str
    digest: str
    scopes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        algo, _, hexdigest = self.digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64:
            raise ConfigError(f"ApiKey {self.name!r}: digest must be hash_api_key(key), 'sha256:<64 hex>'")
        object.__setattr__(self, "scopes", frozenset(self.scopes))


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The API keys a server accepts (``AuthConfig.api_keys``).

    Calls present a key in the ``x-api-key`` header (or as
    ``authorization: ApiKey <key>``).
    """

    keys: tuple[ApiKey, ...]

    def __post_init__(self) -> None:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ConfigError("ApiKeys: key names must be unique")

    @classmethod
    def from_plain(cls, keys: Mapping[str, str], scopes: Mapping[str, Iterable[str]] | None = None) -> ApiKeys:
        """Hash ``{name: key}`` at once (the clear keys are not kept)."""
        scopes = scopes or {}
        return cls(tuple(ApiKey(n, hash_api_key(k), frozenset(scopes.get(n, ()))) for n, k in keys.items()))

    def verify(self, presented: str) -> Identity:
        """The identity of ``presented``; AuthError(UNAUTHENTICATED) if no key matches."""
        digest = hashlib.sha256(presented.encode()).hexdigest().encode()
        found = None
        # Compare with every key, without stopping early, so timing tells
        # nothing about which key (or how much of one) matched.
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest[7:].encode()):
                found = key
        if found is None:
            raise _unauthenticated("unknown API key")
        return Identity(found.name, "api_key", scopes=found.scopes)


# -- JWT --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JWTKey:
    """One verification key, bound to one algorithm.

    Attributes:
        key: the HS256 shared secret, or the RS256/ES256 public key (PEM).
        algorithm: ``"HS256"``, ``"RS256"`` or ``"ES256"``.
        kid: the key id tokens name in their header (optional).
    """

    key: str | bytes
    algorithm: str
    kid: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in SUPPORTED_ALGORITHMS:
            raise ConfigError(f"JWTKey.algorithm must be one of {', '.join(SUPPORTED_ALGORITHMS)}")
        if self.algorithm == "HS256" and len(self.key) < 32:
            raise ConfigError("JWTKey: an HS256 secret must be at least 32 bytes")


@dataclass(frozen=True, slots=True)
class JWTConfig:
    """How JWT bearer tokens are verified (``AuthConfig.jwt``).

    Attributes:
        issuer: the required ``iss`` claim.
        audience: accepted ``aud`` values (a token must name one of them).
        keys: verification keys (each bound to its algorithm).
        jwks_file: a JWKS JSON file with more keys (re-read when it changes
            and a token names a key id it does not know yet).
        algorithms: accepted algorithms (subset of HS256, RS256, ES256).
        leeway: seconds of clock skew allowed on ``exp`` and ``nbf``.
        principal_claim: claim naming the caller (``sub``).
        scope_claims: claims holding scopes: a space-separated string
            (``scope``) or a list (``scp``).
        cache_size: verified tokens remembered until they expire.
    """

    issuer: str
    audience: str | tuple[str, ...]
    keys: tuple[JWTKey, ...] = ()
    jwks_file: str | os.PathLike[str] | None = None
    algorithms: tuple[str, ...] = SUPPORTED_ALGORITHMS
    leeway: float = 30.0
    principal_claim: str = "sub"
    scope_claims: tuple[str, ...] = ("scope", "scp")
    cache_size: int = 10_000

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ConfigError("JWTConfig: issuer and audience are required")
        if not self.keys and self.jwks_file is None:
            raise ConfigError("JWTConfig: give keys or jwks_file")
        bad = [a for a in self.algorithms if a not in SUPPORTED_ALGORITHMS]
        if bad or not self.algorithms:
            raise ConfigError(f"JWTConfig.algorithms: {bad or 'empty'}; use {', '.join(SUPPORTED_ALGORITHMS)}")
        if self.leeway < 0 or self.cache_size < 0:
            raise ConfigError("JWTConfig: leeway and cache_size must be >= 0")


@dataclass(frozen=True, slots=True)
class _Key:
    algorithm: str
    kid: str | None
    prepared: Any


def _prepare(algorithm: str, key: Any, kid: str | None) -> _Key:
    try:
        return _Key(algorithm, kid, jwt.get_algorithm_by_name(algorithm).prepare_key(key))
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"JWT key {kid or ''} is not a valid {algorithm} key: {exc}") from None


def _load_jwks(path: str | os.PathLike[str], accepted: Sequence[str]) -> list[_Key]:
    try:
        data = json.loads(Path(path).read_text())
        keyset = jwt.PyJWKSet.from_dict(data)
    except (OSError, ValueError, jwt.PyJWKError, jwt.PyJWKSetError) as exc:
        raise ConfigError(f"JWTConfig.jwks_file {os.fspath(path)!r}: {exc}") from None
    keys = []
    for jwk in keyset.keys:
        # A JWK without "alg" gets PyJWT's default for its key type; it is
        # still bound to that one algorithm.
        if jwk.algorithm_name in accepted:
            keys.append(_Key(jwk.algorithm_name, jwk.key_id, jwk.key))
    return keys


_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "JWT expired"),
    (jwt.ImmatureSignatureError, "JWT not valid yet (nbf)"),
    (jwt.InvalidAudienceError, "JWT audience not accepted"),
    (jwt.InvalidIssuerError, "JWT issuer not accepted"),
    (jwt.InvalidSignatureError, "JWT signature does not verify"),
    (jwt.MissingRequiredClaimError, "JWT lacks a required claim"),
)


def _reason(exc: jwt.PyJWTError) -> str:
    for exc_type, text in _REASONS:
        if isinstance(exc, exc_type):
            return f"{text}: {exc}" if isinstance(exc, jwt.MissingRequiredClaimError) else text
    return f"JWT rejected: {exc}"


class JWTVerifier:
    """Verifies bearer tokens against a :class:`JWTConfig`, caching successes.

    ``clock`` (default ``time.time``) is injectable for tests.
    """

    def __init__(self, config: JWTConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._accepted = tuple(config.algorithms)
        self._static = [_prepare(k.algorithm, k.key, k.kid) for k in config.keys if k.algorithm in self._accepted]
        self._jwks: list[_Key] = []
        self._jwks_stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        if config.jwks_file is not None:
            self._reload_jwks(force=True)
        if not self._static and not self._jwks:
            raise ConfigError("JWTConfig: no key for any accepted algorithm")
        self._audience = (config.audience,) if isinstance(config.audience, str) else tuple(config.audience)
        # token -> (identity, expiry). Keyed by the token itself: str hashing
        # is randomized per process, so lookups leak nothing useful.
        self._cache: dict[str, tuple[Identity, float]] = {}
        self.verifications = 0  # signature checks done (the cache's misses)

    def _reload_jwks(self, force: bool = False) -> None:
        path = self.config.jwks_file
        assert path is not None
        try:
            st = os.stat(path)
        except OSError as exc:
            if force:
                raise ConfigError(f"JWTConfig.jwks_file {os.fspath(path)!r}: {exc.strerror}") from None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._jwks_stamp:
            try:
                self._jwks = _load_jwks(path, self._accepted)
            except ConfigError:
                if force:
                    raise
                _LOG.warning("JWKS file %s unreadable, keeping the previous keys", os.fspath(path))
                return
            self._jwks_stamp = stamp

    def verify(self, token: str) -> Identity:
        """The identity ``token`` proves; AuthError(UNAUTHENTICATED) with the reason otherwise."""
        cached = self._cache.get(token)
        if cached is not None:
            if self._clock() < cached[1]:
                return cached[0]
            del self._cache[token]
        identity, expires = self._verify(token)
        cache = self._cache
        if self.config.cache_size:
            if len(cache) >= self.config.cache_size:
                # Drop the oldest entry; dicts keep insertion order.
                cache.pop(next(iter(cache)), None)
            cache[token] = (identity, expires)
        return identity

    def _keys_for(self, algorithm: str, kid: str | None) -> list[_Key]:
        if self.config.jwks_file is not None and kid is not None and not any(k.kid == kid for k in self._jwks):
            with self._lock:
                self._reload_jwks()
        keys = [k for k in (*self._static, *self._jwks) if k.algorithm == algorithm]
        if kid is not None:
            keys = [k for k in keys if k.kid == kid or k.kid is None]
        return keys

    def _verify(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthenticated("malformed JWT") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm.lower() == "none":
            raise _unauthenticated("JWT algorithm 'none' is not accepted")
        if algorithm not in self._accepted:
            raise _unauthenticated(f"JWT algorithm {algorithm!r} is not accepted")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        keys = self._keys_for(algorithm, kid)
        if not keys:
            raise _unauthenticated(f"no {algorithm} key" + (f" with kid {kid!r}" if kid else ""))
        return self._decode(token, algorithm, keys)

    def _decode(self, token: str, algorithm: str, keys: list[_Key]) -> tuple[Identity, float]:
        cfg = self.config
        error: jwt.PyJWTError | None = None
        for key in keys:
            self.verifications += 1
            try:
                claims = jwt.decode(
                    token, key.prepared, algorithms=[algorithm], audience=self._audience, issuer=cfg.issuer,
                    leeway=cfg.leeway, options={"require": ["exp", "iss", "aud", cfg.principal_claim]},
                )  # fmt: skip
            except jwt.InvalidSignatureError as exc:
                error = exc  # maybe another key of the same algorithm
                continue
            except jwt.PyJWTError as exc:
                raise _unauthenticated(_reason(exc)) from None
            return self._identity(claims), float(claims["exp"]) + cfg.leeway
        assert error is not None
        raise _unauthenticated(_reason(error))

    def _identity(self, claims: dict[str, Any]) -> Identity:
        principal = claims.get(self.config.principal_claim)
        if not isinstance(principal, str) or not principal:
            raise _unauthenticated(f"JWT claim {self.config.principal_claim!r} must be a non-empty string")
        scopes: set[str] = set()
        for name in self.config.scope_claims:
            value = claims.get(name)
            if isinstance(value, str):
                scopes.update(value.split())
            elif isinstance(value, list):
                scopes.update(str(v) for v in value)
        return Identity(principal, "jwt", scopes=frozenset(scopes), claims=MappingProxyType(claims))


# -- the server's auth settings ----------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who may call a server (``ServerConfig.auth``).

    Attributes:
        jwt: accept ``authorization: Bearer <JWT>`` tokens.
        api_keys: accept ``x-api-key: <key>`` (or ``authorization: ApiKey <key>``).
        mtls: a verified client certificate (``ServerConfig.tls`` with a
            client CA) identifies a caller that sends no token.
        allow_anonymous: let calls without any credential through as
            :data:`~rpcframe.security.identity.ANONYMOUS` (the policy still
            decides); by default they end with UNAUTHENTICATED.
        policy: per-method authorization; ``None`` lets every authenticated
            caller call every method.

    Health and reflection are served outside this check (always allowed).
    """

    jwt: JWTConfig | None = None
    api_keys: ApiKeys | None = None
    mtls: bool = True
    allow_anonymous: bool = False
    policy: Policy | None = None

    def __post_init__(self) -> None:
        if self.jwt is None and self.api_keys is None and not self.mtls and not self.allow_anonymous:
            raise ConfigError("AuthConfig: enable jwt, api_keys, mtls or allow_anonymous")
