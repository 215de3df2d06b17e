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
signature check once, not per call. Keys of a ``jwks_file`` follow the file:
a key removed from it is refused within about a second, cached tokens it
signed included (see :class:`_JwksFile`).
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
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import grpc

from ..errors import ConfigError
from .authz import Policy
from .identity import Identity

# PyJWT (and the cryptography it loads) costs more to import than grpc: it is
# imported where a JWT is handled, so importing rpcframe stays cheap.
if TYPE_CHECKING:
    import jwt

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


#: Why calls are refused, as metrics count them: no credentials, credentials
#: of the wrong shape, credentials that do not verify, an expired token, and
#: a verified caller the policy does not admit.
DENIAL_REASONS = ("missing", "malformed", "invalid", "expired", "denied")


class AuthError(Exception):
    """A call's credentials were refused: the status and message it ends with.

    ``reason`` is one of :data:`DENIAL_REASONS` (a bounded metrics label).
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def _unauthenticated(message: str, reason: str = "invalid") -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message, reason)


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
        jwks_file: a JWKS JSON file with more keys; the file is the source of
            truth. Its stat is checked at most every 0.5 s while calls arrive
            (and at once for an unknown key id): within about a second of a
            change, added keys are accepted and removed ones refused, also
            for tokens already verified and cached. A file that turns
            unreadable or invalid is logged once and the last good key set
            stays in force (so a removed key is never re-admitted); write
            ``{"keys": []}`` to revoke every key.
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
    import jwt

    try:
        return _Key(algorithm, kid, jwt.get_algorithm_by_name(algorithm).prepare_key(key))
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"JWT key {kid or ''} is not a valid {algorithm} key: {exc}") from None


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: tuple[_Key, ...]
    ids: frozenset[str]  # canonical JSON of each accepted JWK: what "the same key" means


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


def _load_jwks(path: str | os.PathLike[str], accepted: Sequence[str]) -> tuple[_KeySet, tuple[int, int, int, int]]:
    """The accepted keys of a JWKS file and the stat of what was read.

    An empty ``{"keys": []}`` is a valid (empty) key set; a file whose
    members are all unusable is taken as broken, not as "revoke everything".
    """
    try:
        with open(path, "rb") as f:
            stamp = _stamp(os.fstat(f.fileno()))  # of the very inode read, even if renamed over meanwhile
            members = json.loads(f.read())["keys"]
        if not isinstance(members, list):
            raise ValueError("'keys' must be a list")
    except OSError as exc:
        raise ConfigError(f"JWTConfig.jwks_file {os.fspath(path)!r}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"JWTConfig.jwks_file {os.fspath(path)!r}: not a JWKS document ({exc!r})") from None
    import jwt

    usable, keys, ids = 0, [], set()
    for member in members:
        try:
            jwk = jwt.PyJWK(member)
        except (jwt.PyJWTError, TypeError, ValueError, AttributeError):
            continue  # skipped, as PyJWKSet does
        usable += 1
        # A JWK without "alg" gets PyJWT's default for its key type; it is
        # still bound to that one algorithm.
        if jwk.algorithm_name in accepted:
            keys.append(_Key(jwk.algorithm_name, jwk.key_id, jwk.key))
            ids.add(json.dumps(member, sort_keys=True))
    if members and not usable:
        raise ConfigError(f"JWTConfig.jwks_file {os.fspath(path)!r}: no usable key in the key set")
    return _KeySet(tuple(keys), frozenset(ids)), stamp


#: Seconds between two stat() checks of a JWKS file while calls arrive.
JWKS_CHECK_INTERVAL = 0.5


class _JwksFile:
    """The keys of a JWKS file, following the file as it changes.

    The file is the source of truth. While calls need a key, its stat
    (mtime_ns, size, inode, device) is checked at most every
    :data:`JWKS_CHECK_INTERVAL` seconds, and at once when a token names an
    unknown key id; a changed file is re-read. When a re-read drops or
    replaces a key, ``generation`` goes up and ``on_removal`` runs, so that
    cached verifications made with the old key set are no longer trusted.

    A file that cannot be read or parsed after a change is logged once (per
    change) and the last good key set stays in force until the file is fixed:
    a half-written file does not lock every caller out, and since the last
    good set is the newest one read, a key removed by an earlier good version
    is never admitted again by this fallback. A missing file is treated the
    same way; to revoke every key, write ``{"keys": []}``.
    """

    def __init__(self, path: str | os.PathLike[str], accepted: Sequence[str], on_removal: Callable[[], None]) -> None:
        self.path = path
        self._accepted = accepted
        self._on_removal = on_removal
        self._lock = threading.Lock()
        self._set, self._stamp = _load_jwks(path, accepted)  # ConfigError: the server does not start
        self._racy = self._is_racy(self._stamp)
        self._missing_logged = False
        self.keys = self._set.keys
        self.generation = 0
        self.next_check = time.monotonic() + JWKS_CHECK_INTERVAL

    @staticmethod
    def _is_racy(stamp: tuple[int, int, int, int]) -> bool:
        # File times are coarse (a clock tick): a same-size rewrite in the same
        # tick keeps the stamp, so a file read that young is read once more.
        return time.time_ns() - stamp[0] < 1_000_000_000

    def poll(self, now: float, force: bool = False) -> None:
        """Re-read the file if it changed; rate-limited unless ``force``."""
        with self._lock:
            if not force and now < self.next_check:
                return  # another thread checked meanwhile
            self.next_check = now + JWKS_CHECK_INTERVAL
            try:
                stamp = _stamp(os.stat(self.path))
            except OSError as exc:
                if not self._missing_logged:
                    self._missing_logged = True
                    _LOG.warning("JWKS file %s: %s; keeping the last good key set", os.fspath(self.path), exc.strerror)
                return
            self._missing_logged = False
            if stamp != self._stamp or self._racy:
                self._reload(stamp)

    def _reload(self, polled: tuple[int, int, int, int]) -> None:
        try:
            keyset, stamp = _load_jwks(self.path, self._accepted)
        except ConfigError as exc:
            self._stamp, self._racy = polled, False  # log this version once, not at every check
            _LOG.warning("%s; keeping the last good key set until the file is fixed", exc)
            return
        self._stamp, self._racy = stamp, self._is_racy(stamp)
        removed = not self._set.ids <= keyset.ids
        self._set, self.keys = keyset, keyset.keys
        if removed:
            # After the new keys are in place: a reader that sees the new
            # generation also sees the new keys.
            self.generation += 1
            self._on_removal()
            _LOG.info("JWKS file %s: keys removed or replaced; cached tokens re-verified", os.fspath(self.path))


@cache
def _reasons() -> tuple[tuple[type[Exception], str], ...]:
    import jwt

    return (
        (jwt.ExpiredSignatureError, "JWT expired"),
        (jwt.ImmatureSignatureError, "JWT not valid yet (nbf)"),
        (jwt.InvalidAudienceError, "JWT audience not accepted"),
        (jwt.InvalidIssuerError, "JWT issuer not accepted"),
        (jwt.InvalidSignatureError, "JWT signature does not verify"),
        (jwt.MissingRequiredClaimError, "JWT lacks a required claim"),
        (jwt.InvalidIssuedAtError, "JWT issued-at (iat) claim is not an integer"),
        (jwt.DecodeError, "malformed JWT"),  # after InvalidSignatureError, its subclass
    )


def _reason(exc: jwt.PyJWTError) -> str:
    """The status message for ``exc``: never PyJWT's text, which may quote the token."""
    import jwt

    for exc_type, text in _reasons():
        if isinstance(exc, exc_type):
            if isinstance(exc, jwt.MissingRequiredClaimError):
                return f"{text}: {exc.claim!r}"  # one of the configured required claims
            return text
    return f"JWT rejected ({type(exc).__name__})"


class JWTVerifier:
    """Verifies bearer tokens against a :class:`JWTConfig`, caching successes.

    ``clock`` (default ``time.time``) is injectable for tests; it only
    decides cache expiry (PyJWT checks the claims on the real clock).

    Status messages never quote the token (its ``kid``, ``alg`` or claims):
    they are fixed texts, so a caller cannot make the server echo its input.
    """

    def __init__(self, config: JWTConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._accepted = tuple(config.algorithms)
        self._static = tuple(_prepare(k.algorithm, k.key, k.kid) for k in config.keys if k.algorithm in self._accepted)
        # token -> (identity, expiry, JWKS generation). Keyed by the token
        # itself: str hashing is randomized per process, so lookups leak
        # nothing useful. The generation makes an entry verified with a key
        # set that has since lost a key worthless, even one stored by a call
        # that raced the change.
        self._cache: dict[str, tuple[Identity, float, int]] = {}
        self._jwks = None if config.jwks_file is None else _JwksFile(config.jwks_file, self._accepted, self._forget)
        if not self._static and not (self._jwks and self._jwks.keys):
            raise ConfigError("JWTConfig: no key for any accepted algorithm")
        self._audience = (config.audience,) if isinstance(config.audience, str) else tuple(config.audience)
        self.verifications = 0  # signature checks done (the cache's misses)

    def _forget(self) -> None:
        # A new dict, not clear(): another thread may be iterating the old one.
        self._cache = {}

    def verify(self, token: str) -> Identity:
        """The identity ``token`` proves; AuthError(UNAUTHENTICATED) with the reason otherwise."""
        jwks, generation = self._jwks, 0
        if jwks is not None:
            now = time.monotonic()
            if now >= jwks.next_check:
                jwks.poll(now)
            generation = jwks.generation  # read before the keys (see _JwksFile._reload)
        cached = self._cache.get(token)
        if cached is not None:
            if cached[2] == generation and self._clock() < cached[1]:
                return cached[0]
            self._cache.pop(token, None)
        identity, expires = self._verify(token)
        if self.config.cache_size:
            self._remember(token, (identity, expires, generation))
        return identity

    def _remember(self, token: str, entry: tuple[Identity, float, int]) -> None:
        cache = self._cache
        if len(cache) >= self.config.cache_size:
            # Drop the oldest entry (dicts keep insertion order); another
            # thread may change the dict meanwhile, then skip this once.
            try:
                cache.pop(next(iter(cache)), None)
            except (StopIteration, RuntimeError):
                pass
        cache[token] = entry

    def _keys_for(self, algorithm: str, kid: str | None) -> list[_Key]:
        jwks = self._jwks
        if jwks is not None and kid is not None and not any(k.kid == kid for k in jwks.keys):
            jwks.poll(time.monotonic(), force=True)  # a key just published: no need to wait for the next check
        keys = [k for k in (*self._static, *(jwks.keys if jwks else ())) if k.algorithm == algorithm]
        if kid is not None:
            keys = [k for k in keys if k.kid == kid or k.kid is None]
        return keys

    def _verify(self, token: str) -> tuple[Identity, float]:
        import jwt  # a cache miss: the signature check costs far more than this lookup

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthenticated("malformed JWT", "malformed") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise _unauthenticated("malformed JWT: no algorithm", "malformed")
        if algorithm.lower() == "none":
            raise _unauthenticated("JWT algorithm 'none' is not accepted")
        if algorithm not in self._accepted:
            raise _unauthenticated(f"JWT algorithm not accepted (use {', '.join(self._accepted)})")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        keys = self._keys_for(algorithm, kid)
        if not keys:
            # algorithm is one of ours by now; the kid is the caller's and not repeated.
            raise _unauthenticated("JWT signed by an unknown key" if kid else f"no {algorithm} key for this JWT")
        return self._decode(token, algorithm, keys)

    def _decode(self, token: str, algorithm: str, keys: list[_Key]) -> tuple[Identity, float]:
        import jwt

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
            except jwt.ExpiredSignatureError as exc:
                raise _unauthenticated(_reason(exc), "expired") from None
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
