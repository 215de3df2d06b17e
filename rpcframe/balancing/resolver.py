"""Resolvers turn a target into endpoint lists and push updates.

Targets understood by :func:`resolver_for`:

- ``host:port`` or ``a:1,b:2`` — a static list (no DNS lookups by rpcframe;
  grpc resolves each host itself);
- ``static:///a:1,b:2`` — the same, explicitly;
- ``dns:///host:port`` — looked up with ``getaddrinfo`` and re-resolved
  every ``dns_refresh`` seconds; changes are pushed to the balancer;
- ``etcd://host:port/key/prefix/`` — the endpoints registered under a key
  prefix in etcd, watched (see :mod:`rpcframe.balancing.etcd`);
- a :class:`Resolver` instance (e.g. :class:`ManualResolver` in tests, or a
  discovery client such as etcd).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ..errors import ConfigError
from .endpoint import Endpoint

__all__ = ["DNSResolver", "Listener", "ManualResolver", "Resolver", "StaticResolver", "resolver_for"]

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


def resolver_for(target: str | Sequence[str] | Resolver, dns_refresh: float = 30.0) -> Resolver:
    """The resolver a target string, address list or resolver stands for."""
    if isinstance(target, Resolver):
        return target
    if not isinstance(target, str):
        return StaticResolver(list(target))
    if target.startswith("dns:///"):
        host, port = _split_host_port(target.removeprefix("dns:///"))
        return DNSResolver(host, port, dns_refresh)
    if target.startswith("etcd://"):
        from .etcd import EtcdResolver  # imported here: etcd.py imports this module

        return EtcdResolver.from_target(target)
    if target.startswith(("unix:", "unix-abstract:")):
        return StaticResolver([target])
    body = target.removeprefix("static:///")
    if "://" in body:
        raise ConfigError(f"{target!r}: unknown target scheme (use host:port, static:///, dns:///, etcd://)")
    return StaticResolver([a.strip() for a in body.split(",") if a.strip()])
