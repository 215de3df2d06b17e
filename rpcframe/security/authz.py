"""Per-method authorization: which callers may call which methods.

A :class:`Policy` is a list of :class:`Rule` values; a call is allowed when
any rule covering its method admits its caller, and refused (deny by
default) otherwise. The server resolves, once per method when it registers
the service, which rules cover it (:meth:`Policy.rules_for`), so a call only
checks the caller against a handful of prepared rules.

Method patterns: ``"*"`` (every method), ``"pkg.Service"`` or
``"pkg.Service/*"`` (a whole service), ``"pkg.Service/Method"`` (with or
without the leading ``/``).

Principal patterns: ``"*"`` (any authenticated caller), ``"jwt:alice"``,
``"api_key:ci-bot"``, ``"mtls:<SAN or subject>"``, or a bare name matching
the caller's principal whatever the method.

Refusals are logged on the ``rpcframe.audit`` logger (WARNING), one line per
refused call with the method, the caller and why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from .identity import Identity

__all__ = ["Policy", "Rule", "audit_denied"]

AUDIT = logging.getLogger("rpcframe.audit")

_PREFIXES = ("jwt:", "api_key:", "mtls:", "none:")


def _method_matches(pattern: str, method: str) -> bool:
    """Whether ``pattern`` covers ``method`` (``/pkg.Service/Method``)."""
    if pattern == "*":
        return True
    service, _, name = method.lstrip("/").partition("/")
    p_service, _, p_name = pattern.lstrip("/").partition("/")
    return p_service == service and p_name in ("", "*", name)


@dataclass(frozen=True, slots=True)
class Rule:
    """Callers admitted to some methods.

    A caller is admitted when it matches one of ``principals`` (any
    authenticated caller when empty), holds every scope in ``scopes`` and
    has every claim in ``claims`` with that value.

    Attributes:
        methods: method patterns this rule covers (see module docstring).
        principals: principal patterns; empty = any authenticated caller.
        scopes: scopes the caller must all hold.
        claims: ``(claim, value)`` pairs the caller's JWT must carry.
        anonymous: also admit callers with no credential (needs
            ``AuthConfig.allow_anonymous``).
    """

    methods: tuple[str, ...]
    principals: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    claims: tuple[tuple[str, object], ...] = ()
    anonymous: bool = False

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("Rule.methods must name at least one method pattern")
        for pattern in self.methods:
            parts = pattern.lstrip("/").split("/")
            if pattern != "*" and (len(parts) > 2 or not all(parts)):
                raise ConfigError(f"Rule.methods: {pattern!r} is not '*', 'pkg.Service' or 'pkg.Service/Method'")

    def covers(self, method: str) -> bool:
        """Whether this rule speaks about ``method``."""
        return any(_method_matches(p, method) for p in self.methods)

    def admits(self, identity: Identity) -> bool:
        """Whether ``identity`` satisfies this rule."""
        if not identity.authenticated:
            return self.anonymous
        if self.principals and not self._principal_matches(identity):
            return False
        if self.scopes and not identity.scopes.issuperset(self.scopes):
            return False
        return all(identity.claims.get(k) == v for k, v in self.claims)

    def _principal_matches(self, identity: Identity) -> bool:
        names = identity.names()
        for pattern in self.principals:
            if pattern == "*" or pattern in names:
                return True
            if not pattern.startswith(_PREFIXES) and pattern == identity.principal:
                return True
        return False


@dataclass(frozen=True, slots=True)
class Policy:
    """Authorization rules; a method no rule admits the caller to is refused.

    Example::

        Policy((
            Rule(("rpcframe.echo.v1.EchoService/Echo",), scopes=("echo",)),
            Rule(("rpcframe.echo.v1.EchoService",), principals=("mtls:admin.internal",)),
        ))
    """

    rules: tuple[Rule, ...]

    @classmethod
    def from_mapping(cls, allowed: Mapping[str, tuple[str, ...] | list[str]]) -> Policy:
        """Shorthand: ``{method pattern: principal patterns}``."""
        return cls(tuple(Rule((m,), tuple(p)) for m, p in allowed.items()))

    def rules_for(self, method: str) -> tuple[Rule, ...]:
        """The rules that speak about ``method`` (resolved once per method)."""
        return tuple(r for r in self.rules if r.covers(method))


def audit_denied(method: str, identity: Identity, peer: str, why: str) -> None:
    """Log one refused call on the ``rpcframe.audit`` logger."""
    who = f"{identity.method}:{identity.principal}" if identity.authenticated else "anonymous"
    AUDIT.warning("denied method=%s principal=%s peer=%s reason=%s", method, who, peer, why)
