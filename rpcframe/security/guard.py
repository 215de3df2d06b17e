"""The server side of auth, as one check at the top of the per-call wrapper.

:class:`Authenticator` is built once per server from ``ServerConfig.auth``
(so the JWT cache is shared by every method) and hands each wrapped method
a guard: ``guard(context)`` returns ``None`` to let the call through, having
recorded the caller for :func:`~rpcframe.security.identity.peer`, or the
``(status, message)`` to end it with. The same guard serves the sync and
asyncio servers: it does no I/O (beyond a stat of a JWT ``jwks_file`` at most
every 0.5 s, and reading it when it changed), the front only differs in how
it aborts.
Without ``ServerConfig.auth`` no guard exists and the wrapper pays nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from .auth import ApiKeys, AuthConfig, AuthError, JWTVerifier
from .authz import AUDIT, audit_denied
from .identity import ANONYMOUS, Identity, mtls_names, set_peer
from .tls import TLSConfig

__all__ = ["Authenticator", "Guard"]

_LOG = logging.getLogger("rpcframe.security")

#: ``guard(context)``: ``None`` (go on) or the ``(code, details)`` to abort with.
Guard = Callable[[Any], tuple[grpc.StatusCode, str] | None]


def _unauthenticated(message: str, reason: str = "malformed") -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message, reason)


class Authenticator:
    """Turns a call's metadata and transport into an Identity, per ``AuthConfig``."""

    def __init__(self, auth: AuthConfig, tls: TLSConfig | None) -> None:
        self.auth = auth
        self.jwt = JWTVerifier(auth.jwt) if auth.jwt is not None else None
        self.api_keys: ApiKeys | None = auth.api_keys
        # Only an mTLS listener has verified client certificates to read.
        self.mtls = auth.mtls and tls is not None and tls.mutual
        self._missing = self._missing_message()
        self._denials: dict[str, int] = {}
        self._denials_lock = threading.Lock()

    def denials(self) -> dict[str, int]:
        """Calls refused so far, by reason (:data:`~rpcframe.security.auth.DENIAL_REASONS`)."""
        with self._denials_lock:
            return dict(self._denials)

    def _denied(self, reason: str) -> None:
        with self._denials_lock:
            self._denials[reason] = self._denials.get(reason, 0) + 1

    def _missing_message(self) -> str:
        ways = []
        if self.jwt is not None:
            ways.append("'authorization: Bearer <JWT>'")
        if self.api_keys is not None:
            ways.append("'x-api-key: <key>'")
        if self.mtls:
            ways.append("a client certificate")
        return "missing credentials: send " + " or ".join(ways) if ways else "anonymous calls are not accepted"

    def authenticate(self, metadata: Iterable[tuple[str, Any]], context: Any) -> Identity:
        """The caller's identity; AuthError(UNAUTHENTICATED) with the reason otherwise.

        At most one ``authorization`` and one ``x-api-key`` header: a call
        with two of either is UNAUTHENTICATED. Messages never quote what the
        caller sent.
        """
        authorization = api_key = None
        for key, value in metadata:
            # A repeated credential header is refused, not resolved: proxies
            # and handlers may each read a different copy.
            if key == "authorization":
                if authorization is not None:
                    raise _unauthenticated("more than one authorization header")
                authorization = value
            elif key == "x-api-key":
                if api_key is not None:
                    raise _unauthenticated("more than one x-api-key header")
                api_key = value
        cert = mtls_names(context.auth_context()) if self.mtls else None
        if authorization is not None:
            return self._from_authorization(str(authorization)).with_certificate(cert)
        if api_key is not None:
            if self.api_keys is None:
                raise _unauthenticated("API keys are not accepted by this server")
            return self.api_keys.verify(str(api_key)).with_certificate(cert)
        if cert is not None:
            return cert
        if self.auth.allow_anonymous:
            return ANONYMOUS
        raise _unauthenticated(self._missing, "missing")

    def _from_authorization(self, value: str) -> Identity:
        scheme, _, credential = value.strip().partition(" ")
        scheme, credential = scheme.lower(), credential.strip()
        if not credential:
            raise _unauthenticated("malformed authorization header: expected '<scheme> <credential>'")
        if scheme == "bearer" and self.jwt is not None:
            return self.jwt.verify(credential)
        if scheme in ("apikey", "bearer") and self.api_keys is not None:
            return self.api_keys.verify(credential)
        accepted = (["Bearer"] if self.jwt or self.api_keys else []) + (["ApiKey"] if self.api_keys else [])
        # The scheme is the caller's text: not repeated back.
        raise _unauthenticated(f"authorization scheme not accepted (use {' or '.join(accepted) or 'none'})")

    def guard(self, method: str) -> Guard:
        """The per-call check for ``method`` (its policy rules resolved now)."""
        policy = self.auth.policy
        rules = policy.rules_for(method) if policy is not None else None
        authenticate, denied = self.authenticate, self._denied

        def guard(context: Any) -> tuple[grpc.StatusCode, str] | None:
            try:
                identity = authenticate(context.invocation_metadata() or (), context)
            except AuthError as exc:
                denied(exc.reason)
                AUDIT.info("unauthenticated method=%s peer=%s reason=%s", method, context.peer(), exc.message)
                return exc.code, exc.message
            if rules is not None and not any(rule.admits(identity) for rule in rules):
                who = f"{identity.method}:{identity.principal}" if identity.authenticated else "anonymous caller"
                why = "no rule covers the method" if not rules else "no rule admits the caller"
                denied("denied")
                audit_denied(method, identity, context.peer(), why)
                return grpc.StatusCode.PERMISSION_DENIED, f"{who} may not call {method}"
            set_peer(context, identity)
            return None

        return guard


def authenticator(auth: AuthConfig | None, tls: TLSConfig | None) -> Authenticator | None:
    """A server's authenticator (``guard(method)`` per method, ``denials()``); None when auth is off."""
    return None if auth is None else Authenticator(auth, tls)
