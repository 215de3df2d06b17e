"""Resolvers turn a target into endpoint lists and push updates.

Targets understood by :func:`resolver_for`:

- ``host:port`` or ``a:1,b:2`` — a static list (no DNS lookups by rpcframe;
  grpc resolves each host itself);
- ``static:///a:1,b:2`` — the same, explicitly;
- ``dns:///host:port`` — looked up with ``getaddrinfo`` and re-resolved
  every ``dns_refresh`` seconds; changes are pushed to the balancer;
- ``etcd://host:port/key/prefix/`` — the endpoints registered under a key
  prefix in etcd, watched (see :mod:`rpcframe.discovery.etcd_resolver`);
- ``SCHEME://...`` for any scheme added with :func:`register_resolver`;
- a :class:`Resolver` instance (e.g. :class:`ManualResolver` in tests, or a
  discovery client such as etcd).

Schemes map to factories in one registry, as grpc-go's ``resolver.Register``
does. A factory may be named by ``"module:attribute"`` and is imported the
first time a target uses its scheme: that is how ``etcd`` stays unloaded
(and this module free of an import of it) until an ``etcd://`` target comes.
"""

from __future__ import annotations

import importlib
import re
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, cast, runtime_checkable

from .._core.errors import ConfigError
from .endpoint import Endpoint

__all__ = [
    "DNSResolver",
    "Listener",
    "ManualResolver",
    "Resolver",
    "ResolverFactory",
    "StaticResolver",
    "register_resolver",
    "resolver_for",
]

Listener = Callable[[Sequence[Endpoint]], None]


@runtime_checkable
class Resolver(Protocol):
    """Produces endpoint lists for a target and pushes every change.

    ``start`` must call ``listener`` with the first list (possibly later, from
    another thread) and again whenever the list changes; ``close`` stops it.
    """

    def start(self, listener: Listener) -> None:
        """Begin resolving; report lists to ``listener``."""
        ...

    def close(self) -> None:
        """Stop resolving; no more listener calls after this returns."""
        ...


class StaticResolver:
    """A fixed list of endpoints."""

    def __init__(self, endpoints: Sequence[Endpoint | str]) -> None:
        self.endpoints = tuple(e if isinstance(e, Endpoint) else Endpoint(e) for e in endpoints)
        if not self.endpoints:
            raise ConfigError("a static target needs at least one address")

    def start(self, listener: Listener) -> None:
        """Report the list once."""
        listener(self.endpoints)

    def close(self) -> None:
        """Nothing to stop."""


class ManualResolver:
    """A resolver driven by hand: ``update()`` pushes a new list (for tests)."""

    def __init__(self, endpoints: Sequence[Endpoint | str] = ()) -> None:
        self._endpoints = tuple(e if isinstance(e, Endpoint) else Endpoint(e) for e in endpoints)
        self._listener: Listener | None = None

    def start(self, listener: Listener) -> None:
        """Report the current list, and later ones as they are pushed."""
        self._listener = listener
        listener(self._endpoints)

    def update(self, endpoints: Sequence[Endpoint | str]) -> None:
        """Replace the endpoint list."""
        self._endpoints = tuple(e if isinstance(e, Endpoint) else Endpoint(e) for e in endpoints)
        if self._listener is not None:
            self._listener(self._endpoints)

    def close(self) -> None:
        """Stop pushing updates."""
        self._listener = None


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DNSResolver:
    """``getaddrinfo`` on a background thread, repeated every ``refresh`` seconds.

    A failed lookup keeps the last good list (and is retried next period), so
    a DNS hiccup never empties the balancer.
    """

    def __init__(self, host: str, port: int, refresh: float = 30.0) -> None:
        self.host, self.port, self.refresh = host, port, refresh
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[Endpoint, ...] | None = None
        self.last_error: str | None = None

    def lookup(self) -> tuple[Endpoint, ...]:
        """Resolve once (sorted, de-duplicated)."""
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        addresses = sorted({_format_address(str(info[4][0]), self.port) for info in infos})
        return tuple(Endpoint(a) for a in addresses)

    def start(self, listener: Listener) -> None:
        """Resolve now (reporting the result) and keep re-resolving."""
        self._resolve(listener)
        self._thread = threading.Thread(target=self._loop, args=(listener,), daemon=True, name="rpcframe-dns")
        self._thread.start()

    def _resolve(self, listener: Listener) -> None:
        try:
            endpoints = self.lookup()
        except OSError as exc:
            self.last_error = f"DNS lookup of {self.host} failed: {exc}"
            if self._last is None:
                listener(())
                self._last = ()
            return
        self.last_error = None
        if endpoints != self._last:
            self._last = endpoints
            listener(endpoints)

    def _loop(self, listener: Listener) -> None:
        while not self._stop.wait(self.refresh):
            self._resolve(listener)

    def close(self) -> None:
        """Stop re-resolving."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{address!r}: expected host:port")
    return host.strip("[]"), int(port)


ResolverFactory = Callable[[str, float], Resolver]
"""Builds the resolver of a target: ``factory(target, refresh)``.

``target`` is the whole target string (``scheme://...``); ``refresh`` is the
channel's ``dns_refresh``, how often a resolver that polls should look again
(one that is pushed changes ignores it). Bad targets raise ConfigError.
"""

# RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ); compared lowercased.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")

# scheme -> factory, or "module:attribute" until first used.
_FACTORIES: dict[str, ResolverFactory | str] = {}


def register_resolver(scheme: str, factory: ResolverFactory | str) -> None:
    """Resolve ``scheme://...`` targets with ``factory(target, refresh)``.

    Like grpc-go's ``resolver.Register``: call it at startup, before channels
    to such targets are made; registering a scheme again replaces its factory
    (built-in ones too). ``factory`` may be a ``"module:attribute"`` string,
    imported the first time a target uses the scheme, so an optional client
    library loads only when needed. Schemes are case-insensitive.

    Example::

        rpcframe.register_resolver("consul", lambda target, refresh: ConsulResolver(target))
        rpcframe.connect("consul://orders")
    """
    key = scheme.lower()
    if not _SCHEME.fullmatch(key):
        raise ConfigError(f"{scheme!r} is not a URI scheme (a letter, then letters, digits, '+', '-' or '.')")
    if not callable(factory) and not (isinstance(factory, str) and ":" in factory):
        raise ConfigError(f"register_resolver({scheme!r}, ...): give a callable or a 'module:attribute' string")
    _FACTORIES[key] = factory


def _factory(scheme: str, target: str) -> ResolverFactory:
    found = _FACTORIES.get(scheme.lower())
    if found is None:
        known = ", ".join(sorted(_FACTORIES))
        raise ConfigError(f"{target!r}: unknown target scheme (known: {known}; add one with register_resolver)")
    if isinstance(found, str):
        found = _load(scheme, found)
        _FACTORIES[scheme.lower()] = found
    return found


def _load(scheme: str, spec: str) -> ResolverFactory:
    """The factory a ``module:attribute`` string names (imported now)."""
    module_name, _, path = spec.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for name in path.split("."):
            obj = getattr(obj, name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"the resolver of {scheme}:// targets ({spec}) cannot be loaded: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"the resolver of {scheme}:// targets ({spec}) is not callable")
    return cast(ResolverFactory, obj)


def _static_list(body: str) -> Resolver:
    return StaticResolver([a.strip() for a in body.split(",") if a.strip()])


def _static(target: str, refresh: float) -> Resolver:
    authority, _, body = target.partition("://")[2].partition("/")
    if authority or "://" in body:
        raise ConfigError(f"{target!r}: expected static:///host:port[,host:port...]")
    return _static_list(body)


def _dns(target: str, refresh: float) -> Resolver:
    authority, _, address = target.partition("://")[2].partition("/")
    if authority:
        raise ConfigError(f"{target!r}: expected dns:///host:port (a DNS server authority is not supported)")
    host, port = _split_host_port(address)
    return DNSResolver(host, port, refresh)


register_resolver("static", _static)
register_resolver("dns", _dns)
register_resolver("etcd", "rpcframe.discovery.etcd_resolver:resolver_factory")


def resolver_for(target: str | Sequence[str] | Resolver, dns_refresh: float = 30.0) -> Resolver:
    """The resolver a target string, address list or resolver stands for."""
    if isinstance(target, Resolver):
        return target
    if not isinstance(target, str):
        return StaticResolver(list(target))
    if target.startswith(("unix:", "unix-abstract:")):
        return StaticResolver([target])  # grpc's own target syntax, passed through
    scheme, sep, _ = target.partition("://")
    if not sep:
        return _static_list(target)
    return _factory(scheme, target)(target, dns_refresh)
