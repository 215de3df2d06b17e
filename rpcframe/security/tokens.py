"""Client-side credentials: a static token or a refreshing token provider.

``ChannelConfig(token=...)`` takes a string (sent as ``authorization: Bearer
<token>``), a :class:`StaticToken` (any header and scheme, e.g. an API key in
``x-api-key``) or a :class:`RefreshingToken`. The channel adds the header as
call metadata in its one per-call wrapper: a static token is folded into the
channel's fixed metadata once, so it costs nothing per call; a refreshing one
is asked per call and answers from its cache.

Tokens are refused over plaintext (a :class:`~rpcframe.errors.ConfigError`
when the channel is made) unless every address is loopback or a unix socket,
or ``ChannelConfig.allow_insecure_token=True``. grpcio's own call credentials
are silently dropped on insecure channels; rpcframe says so instead.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import ConfigError

__all__ = ["RefreshingToken", "StaticToken", "TokenSource", "check_token_transport", "token_parts"]

_LOG = logging.getLogger("rpcframe.security")

Header = tuple[str, str]


@runtime_checkable
class TokenSource(Protocol):
    """Anything that yields the credential header for a call."""

    def header(self) -> Header:
        """``(metadata key, value)`` to send with the next call."""
        ...


@dataclass(frozen=True, slots=True)
class StaticToken:
    """A token that never changes.

    Attributes:
        token: the credential.
        scheme: prefix of the header value (``"Bearer"``); ``None`` for none
            (e.g. ``StaticToken(key, scheme=None, key_name="x-api-key")``).
        key_name: the metadata key (``"authorization"``).
    """

    token: str
    scheme: str | None = "Bearer"
    key_name: str = "authorization"

    def __post_init__(self) -> None:
        if not self.token or any(c in self.token for c in "\r\n"):
            raise ConfigError("StaticToken.token must be a non-empty single line")
        if self.key_name != self.key_name.lower() or self.key_name.startswith("grpc-"):
            raise ConfigError(f"StaticToken.key_name {self.key_name!r} must be lower case, not 'grpc-'")

    def header(self) -> Header:
        """The header sent with every call."""
        return self.key_name, f"{self.scheme} {self.token}" if self.scheme else self.token


class RefreshingToken:
    """A token fetched by ``fetch()`` and fetched again before it expires.

    ``fetch`` returns ``(token, expires_at)`` with ``expires_at`` in
    ``time.time()`` seconds (``None``: never expires). Calls use the cached
    token; within ``refresh_before`` seconds of expiry one background thread
    fetches the next one while calls keep using the current one, and only a
    token that has actually expired makes a call wait for ``fetch``. A
    failed background fetch is logged and retried on a later call.

    Example::

        def fetch():
            reply = requests.post(TOKEN_URL, data=CLIENT_CREDENTIALS).json()
            return reply["access_token"], time.time() + reply["expires_in"]

        config = rpcframe.ChannelConfig(tls=..., token=RefreshingToken(fetch))
    """

    def __init__(
        self,
        fetch: Callable[[], tuple[str, float | None]],
        *,
        refresh_before: float = 60.0,
        scheme: str | None = "Bearer",
        key_name: str = "authorization",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._refresh_before = refresh_before
        self._scheme = scheme
        self._key_name = key_name
        self._clock = clock
        self._lock = threading.Lock()
        self._header: Header | None = None
        self._expires: float | None = None
        self._refreshing = False
        self.fetches = 0

    def header(self) -> Header:
        """The current header, fetching a new token when needed."""
        header, expires = self._header, self._expires
        if header is not None and (expires is None or self._clock() < expires - self._refresh_before):
            return header
        if header is not None and expires is not None and self._clock() < expires:
            self._refresh_in_background()
            return header
        with self._lock:
            if self._header is None or (self._expires is not None and self._clock() >= self._expires):
                self._store(*self._fetch())
            assert self._header is not None
            return self._header

    def _store(self, token: str, expires: float | None) -> None:
        self.fetches += 1
        self._header = (self._key_name, f"{self._scheme} {token}" if self._scheme else token)
        self._expires = expires

    def _refresh_in_background(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
        threading.Thread(target=self._refresh, daemon=True, name="rpcframe-token-refresh").start()

    def _refresh(self) -> None:
        try:
            token, expires = self._fetch()
            with self._lock:
                self._store(token, expires)
        except Exception:
            _LOG.warning("token refresh failed; keeping the current token until it expires", exc_info=True)
        finally:
            self._refreshing = False


def token_parts(token: str | TokenSource) -> tuple[tuple[Header, ...], Callable[[], Header] | None]:
    """(fixed headers, per-call header function) for a channel's token setting."""
    source = StaticToken(token) if isinstance(token, str) else token
    if not isinstance(source, TokenSource):
        kind = type(token).__name__
        raise ConfigError(f"ChannelConfig.token must be a str, StaticToken or RefreshingToken, got {kind}")
    if isinstance(source, StaticToken):
        return (source.header(),), None
    return (), source.header


def _is_local_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_local_address(address: str) -> bool:
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    address = address.removeprefix("dns:///").removeprefix("static:///")
    host, sep, port = address.rpartition(":")
    return bool(sep) and port.isdigit() and _is_local_host(host)


def check_token_transport(target: object, has_tls: bool, allow_insecure: bool) -> None:
    """Refuse a token over plaintext unless the target is local or the user opted in.

    ``target`` is the channel's target: a string (``host:port``, a comma
    list, ``dns:///``, ``unix:``), a list of addresses, or a resolver (whose
    addresses cannot be known in advance, so it needs TLS or the opt-in).
    """
    if has_tls or allow_insecure:
        return
    if isinstance(target, str):
        if target.startswith(("unix:", "unix-abstract:")):
            return
        if target.startswith("etcd://"):
            raise ConfigError(
                f"ChannelConfig.token over plaintext to endpoints discovered through {target}: their "
                "addresses are not known in advance; set ChannelConfig.tls, or allow_insecure_token=True "
                "if the network is trusted"
            )
        addresses: Sequence[str] = [a.strip() for a in target.removeprefix("static:///").split(",") if a.strip()]
    elif isinstance(target, list | tuple):
        addresses = [str(a) for a in target]
    else:
        raise ConfigError(
            "ChannelConfig.token over plaintext to a custom resolver: set ChannelConfig.tls, "
            "or allow_insecure_token=True if the network is trusted"
        )
    remote = [a for a in addresses if not _is_local_address(a)]
    if remote or not addresses:
        raise ConfigError(
            f"ChannelConfig.token would be sent in clear text to {', '.join(remote) or target!r}: "
            "set ChannelConfig.tls, or allow_insecure_token=True if the network is trusted "
            "(tokens go over plaintext only to loopback or unix sockets)"
        )
