"""Service discovery through etcd, server side: a key under a lease, kept alive.

A backend announces itself under the prefix its clients watch
(``etcd://HOST:PORT/services/echo/`` targets, see
:mod:`rpcframe.discovery.etcd_resolver`) and removes itself on shutdown::

    with rpcframe.EtcdRegistration("10.0.0.5:2379", "/services/echo/host-1", "10.0.0.7:50051"):
        server.run()
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from .._core.errors import ConfigError
from ..balancing.endpoint import Endpoint
from .etcd_gateway import (
    JOIN_TIMEOUT,
    LOG,
    MIN_BACKOFF,
    NOT_FOUND,
    ClientClosed,
    EtcdError,
    GatewayClient,
    Reachability,
    b64,
    endpoint_value,
    jittered,
)

__all__ = ["EtcdRegistration"]


class EtcdRegistration:
    """A key under a lease, kept alive on a daemon thread until ``close()``.

    ``value`` is an :class:`~rpcframe.Endpoint`, a ``host:port`` string or a
    mapping (stored as JSON, see :func:`endpoint_value`). The constructor
    grants the lease and puts the key (raising :class:`EtcdError` or
    ``OSError`` when etcd cannot be reached, so a misconfigured registry shows
    at startup; in asyncio, build it with ``asyncio.to_thread``). The lease is
    refreshed every ``ttl / 3`` s; when etcd is unreachable it is retried, and
    a lease that expired meanwhile is granted anew and the key put again.

    ``close()`` revokes the lease, so watchers drop the endpoint at once;
    ``close(revoke=False)`` only stops refreshing it (the key goes after
    ``ttl`` s, as if the process had died). Also a context manager.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        key: str,
        value: Endpoint | str | Mapping[str, Any],
        ttl: int = 10,
        *,
        timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not key:
            raise ConfigError("EtcdRegistration needs a key, e.g. '/services/echo/host-1'")
        if ttl < 1 or timeout <= 0:
            raise ConfigError("EtcdRegistration: ttl must be >= 1 s and timeout positive")
        self.key, self.ttl, self.timeout = key, int(ttl), timeout
        self.value = endpoint_value(value)
        self._etcd, self._ssl = endpoints, ssl_context
        self._client = GatewayClient(endpoints, timeout, ssl_context)
        self._health = Reachability(f"lease of {key}")
        self._lock = threading.Lock()  # one grant/put at a time (thread vs update())
        self._stop = threading.Event()
        self._closed = False
        self.lease_id = 0
        self._register()
        self._health.ok(self._client.url, "registered")
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rpcframe-etcd-lease {key}")
        self._thread.start()

    @property
    def connected(self) -> bool:
        """True while etcd answers the lease refreshes."""
        return self._health.healthy is True

    def update(self, value: Endpoint | str | Mapping[str, Any]) -> None:
        """Replace the value (new weight, metadata...) under the same lease."""
        text = endpoint_value(value)
        if self._closed:
            raise RuntimeError(f"the registration of {self.key} is closed")
        with self._lock:
            self.value = text
            if not self.lease_id:  # without a lease the key would outlive us; the thread puts it on re-grant
                return
            try:
                self._put()
            except EtcdError as exc:
                if exc.code != NOT_FOUND:
                    raise
                # The lease just expired: the thread grants a new one and puts this value.

    def _register(self) -> None:
        with self._lock:
            answer = self._client.call("/v3/lease/grant", {"TTL": self.ttl})
            self.lease_id = int(answer["ID"])
            self._put()

    def _put(self) -> None:
        body = {"key": b64(self.key.encode()), "value": b64(self.value.encode()), "lease": str(self.lease_id)}
        self._client.call("/v3/kv/put", body)

    def _run(self) -> None:
        interval = self.ttl / 3  # two refreshes may fail before the lease lapses
        delay = MIN_BACKOFF
        wait = interval
        while not self._stop.wait(wait):
            try:
                if self.lease_id == 0:
                    self._register()
                else:
                    answer = self._client.call("/v3/lease/keepalive", {"ID": str(self.lease_id)})
                    if int(answer.get("TTL", 0)) <= 0:  # etcd forgot the lease: it expired
                        LOG.warning("etcd lease of %s expired; registering it again", self.key)
                        self.lease_id = 0
                        self._register()
                self._health.ok(self._client.url, f"lease {self.lease_id} refreshed")
                delay, wait = MIN_BACKOFF, interval
            except ClientClosed:
                return
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._health.failed(self._client.url, exc, f"retrying (the lease lasts {self.ttl} s)")
                self._client.rotate()
                wait = min(jittered(delay), interval)
                delay = min(delay * 2, interval)

    def close(self, revoke: bool = True) -> None:
        """Stop refreshing the lease and (unless ``revoke=False``) revoke it now."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._client.abort()
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)
        if revoke and self.lease_id:
            self._revoke()

    def _revoke(self) -> None:
        client = GatewayClient(self._etcd, self.timeout, self._ssl)  # the thread's client is aborted
        deadline = time.monotonic() + self.timeout
        error: Exception = EtcdError("no etcd endpoint tried")
        for _ in range(client.count):
            try:
                client.call("/v3/lease/revoke", {"ID": str(self.lease_id)}, max(0.1, deadline - time.monotonic()))
                return
            except EtcdError as exc:
                if exc.code == NOT_FOUND:  # already expired: nothing left to remove
                    return
                error = exc
            except Exception as exc:
                error = exc
            client.rotate()
            if time.monotonic() >= deadline:
                break
        LOG.warning("could not revoke the etcd lease of %s (%s); the key goes in %d s", self.key, error, self.ttl)

    def __enter__(self) -> EtcdRegistration:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EtcdRegistration({self._client.url!r}, {self.key!r}, lease={self.lease_id})"
