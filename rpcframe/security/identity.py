"""Who is calling: the peer identity a handler can ask for.

The server's per-call wrapper authenticates each call (when
``ServerConfig.auth`` is set) and records the resulting :class:`Identity` in
a context variable together with the call's context object. A handler asks
with :func:`peer`::

    def GetOrder(self, request, context):
        who = rpcframe.security.peer(context)
        log.info("%s (%s) asked for %s", who.principal, who.method, request.id)

Storing the context object next to the identity is what makes a stale value
harmless: the sync server reuses threads, so a variable set by an earlier
call may still be visible; :func:`peer` only trusts it when it belongs to
the same call, and otherwise derives the identity from the transport alone.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ANONYMOUS", "Identity", "mtls_names", "peer", "set_peer"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated caller of one call.

    Attributes:
        principal: the caller's name: the JWT subject, the API key's name, or
            the client certificate's first SAN (CN when it has none);
            ``None`` for an anonymous caller.
        method: how it was authenticated: ``"jwt"``, ``"api_key"``,
            ``"mtls"`` or ``"none"``.
        subject: the client certificate's subject (RFC 4514), when mTLS.
        sans: the client certificate's subject alternative names.
        scopes: scopes granted by the token or API key.
        claims: the verified JWT claims (empty otherwise).
    """

    principal: str | None
    method: str
    subject: str | None = None
    sans: tuple[str, ...] = ()
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, hash=False)

    @property
    def authenticated(self) -> bool:
        """Whether any credential identified the caller."""
        return self.method != "none"

    def names(self) -> frozenset[str]:
        """Every ``method:name`` this identity answers to (policy matching)."""
        out = set()
        if self.principal is not None:
            out.add(f"{self.method}:{self.principal}")
        if self.subject is not None:
            out.add(f"mtls:{self.subject}")
        out.update(f"mtls:{san}" for san in self.sans)
        return frozenset(out)

    def with_certificate(self, cert: Identity | None) -> Identity:
        """This token identity, also carrying the mTLS certificate's names."""
        if cert is None:
            return self
        return Identity(self.principal, self.method, cert.subject, cert.sans, self.scopes, self.claims)


#: The identity of a call no credential identified.
ANONYMOUS = Identity(None, "none")


def _text(values: Any) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values or ()]


def mtls_names(auth_context: Mapping[str, Any]) -> Identity | None:
    """The client certificate's identity from grpc's ``auth_context()``, if any."""
    subject = _text(auth_context.get("x509_subject"))
    sans = tuple(_text(auth_context.get("x509_subject_alternative_name")))
    common = _text(auth_context.get("x509_common_name"))
    if not subject and not sans and not common:
        return None
    principal = sans[0] if sans else (common[0] if common else subject[0])
    return Identity(principal, "mtls", subject[0] if subject else None, sans)


_CURRENT: contextvars.ContextVar[tuple[object, Identity]] = contextvars.ContextVar("rpcframe_peer")


def set_peer(context: object, identity: Identity) -> None:
    """Record ``identity`` as the caller of the call ``context`` belongs to."""
    _CURRENT.set((context, identity))


def peer(context: Any) -> Identity:
    """The caller of the call ``context`` (a grpc servicer context) belongs to.

    With ``ServerConfig.auth`` set, this is what the wrapper authenticated.
    Without it, the client certificate's names on an mTLS connection (method
    ``"mtls"``), else :data:`ANONYMOUS`.
    """
    current = _CURRENT.get(None)
    if current is not None and current[0] is context:
        return current[1]
    try:
        found = mtls_names(context.auth_context())
    except (AttributeError, ValueError):
        found = None
    return found or ANONYMOUS
