"""Transport security, authentication and authorization for rpcframe.

- :class:`TLSConfig`: TLS and mTLS for servers (``ServerConfig.tls``) and
  clients (``ChannelConfig.tls``); server certificates reload from files.
- :class:`AuthConfig`: who may call a server (``ServerConfig.auth``): JWT
  bearer tokens (:class:`JWTConfig`), API keys (:class:`ApiKeys`), client
  certificates, and a per-method :class:`Policy` of :class:`Rule` values.
- :func:`peer`: the caller of the current call, from inside a handler.
- :class:`StaticToken` / :class:`RefreshingToken`: what a client sends
  (``ChannelConfig.token``).

Statuses: missing or invalid credentials end a call with UNAUTHENTICATED, a
caller the policy does not admit with PERMISSION_DENIED (and an audit log
line); a failed TLS handshake never reaches the server's code and the
client sees UNAVAILABLE.
"""

from .auth import DENIAL_REASONS, ApiKey, ApiKeys, AuthConfig, AuthError, JWTConfig, JWTKey, JWTVerifier, hash_api_key
from .authz import Policy, Rule
from .identity import ANONYMOUS, Identity, peer
from .tls import TLSConfig
from .tokens import RefreshingToken, StaticToken, TokenSource

__all__ = [
    "ANONYMOUS",
    "DENIAL_REASONS",
    "ApiKey",
    "ApiKeys",
    "AuthConfig",
    "AuthError",
    "Identity",
    "JWTConfig",
    "JWTKey",
    "JWTVerifier",
    "Policy",
    "RefreshingToken",
    "Rule",
    "StaticToken",
    "TLSConfig",
    "TokenSource",
    "hash_api_key",
    "peer",
]
