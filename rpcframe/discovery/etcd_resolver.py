"""Service discovery through etcd, client side: a resolver that watches a key prefix.

Backends register themselves under a prefix, one key each, with a lease that
they keep alive (:class:`~rpcframe.EtcdRegistration`); clients list the
prefix and watch it::

    /services/echo/a  ->  {"address": "10.0.0.1:50051", "weight": 2, "metadata": {"zone": "a"}}
    /services/echo/b  ->  10.0.0.2:50051                 (a bare host:port works too)

:class:`EtcdResolver` pushes the endpoint list on every change (key added,
value changed, key deleted, lease expired). It is what an
``etcd://HOST:PORT/prefix/`` target resolves to; the ``etcd`` scheme is
registered by name in :mod:`rpcframe.balancing.resolver`, so this module (and
``http.client``) load only when such a target is used.

Failure handling, in short: every request has a timeout; when etcd cannot be
reached, or the watch stream breaks, the resolver keeps the last endpoint
list it had (an etcd outage never empties a balancer), retries with jittered
exponential backoff over the configured etcd endpoints, and resumes the watch
from the last revision it saw, so no change is lost; a revision that was
compacted meanwhile (or an etcd whose history went back) leads to a fresh
read of the prefix. Each state change is logged once on the
``rpcframe.discovery`` logger.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .._core.errors import ConfigError
from ..balancing.endpoint import Endpoint
from ..balancing.resolver import Listener
from .etcd_gateway import (
    DEFAULT_ENDPOINTS,
    JOIN_TIMEOUT,
    LOG,
    MIN_BACKOFF,
    ClientClosed,
    EtcdError,
    GatewayClient,
    JSONObject,
    Reachability,
    WatchIdle,
    b64,
    endpoint_from_value,
    jittered,
    prefix_range_end,
    unb64,
)

__all__ = ["EtcdResolver", "resolver_factory"]

#: A watch that held this long (seconds) resets the backoff when it breaks;
#: one that breaks sooner keeps backing off, so a flapping etcd is not hammered.
_STABLE = 1.0


class EtcdResolver:
    """Endpoints registered under an etcd prefix, watched for changes.

    ``endpoints`` are etcd's client URLs (``host:port``, ``http://host:port``
    or ``https://host:port``, a list or comma-separated; tried in turn when
    one fails). ``prefix`` is the key prefix, e.g. ``/services/echo/`` (the
    trailing slash keeps ``/services/echo-admin/`` out). Values are read by
    :func:`endpoint_from_value`; the list is ordered by key.

    ``start`` reads the prefix once on the calling thread, waiting at most
    ``start_timeout`` s (so a channel has its endpoints before its first
    call), then watches on a daemon thread. If that first read fails, the
    thread keeps trying and the channel stays "resolving" until it succeeds.
    ``timeout`` bounds every request; a watch that stays silent for
    ``watch_timeout`` s is re-created, which bounds how long a dead
    connection can go unnoticed.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = DEFAULT_ENDPOINTS,
        prefix: str = "",
        *,
        timeout: float = 5.0,
        watch_timeout: float = 30.0,
        max_backoff: float = 5.0,
        start_timeout: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not prefix:
            raise ConfigError("EtcdResolver needs a key prefix, e.g. prefix='/services/echo/'")
        if min(timeout, watch_timeout, max_backoff) <= 0:
            raise ConfigError("EtcdResolver timeouts and max_backoff must be positive")
        self.prefix = prefix
        self.timeout, self.watch_timeout, self.max_backoff = timeout, watch_timeout, max_backoff
        self.start_timeout = start_timeout
        self._key = prefix.encode()
        self._range = {"key": b64(self._key), "range_end": b64(prefix_range_end(self._key))}
        self._client = GatewayClient(endpoints, timeout, ssl_context)
        self._health = Reachability(f"prefix {prefix}")
        self._stop = threading.Event()
        self._push_lock = threading.RLock()  # re-entrant: a listener may close the resolver
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        # key -> (raw value, endpoint or None when the value is not one); the
        # raw value lets a re-read skip (and not re-log) unchanged values.
        self._kvs: dict[bytes, tuple[bytes, Endpoint | None]] = {}
        self._revision = 0  # the store revision self._kvs reflects
        self._cluster = ""
        self._listed = False
        self._current: tuple[Endpoint, ...] | None = None
        self._watching_since: float | None = None  # when the current watch was established

    @classmethod
    def from_target(cls, target: str, **kwargs: Any) -> EtcdResolver:
        """The resolver for ``etcd://HOST:PORT[,HOST:PORT...]/prefix/`` (no host: 127.0.0.1:2379)."""
        hosts, slash, path = target.removeprefix("etcd://").partition("/")
        if not slash or not path:
            raise ConfigError(f"{target!r}: expected etcd://HOST:PORT/key/prefix/")
        return cls(hosts or DEFAULT_ENDPOINTS, "/" + path, **kwargs)

    @property
    def current(self) -> tuple[Endpoint, ...] | None:
        """The endpoint list last pushed (None before the first successful read)."""
        return self._current

    @property
    def connected(self) -> bool:
        """True while etcd answers (the last request or watch succeeded)."""
        return self._health.healthy is True

    @property
    def last_error(self) -> str | None:
        """Why etcd is unreachable now (None while it answers)."""
        return self._health.last_error

    @property
    def revision(self) -> int:
        """The etcd revision the current list reflects."""
        return self._revision

    def start(self, listener: Listener) -> None:
        """Read the prefix (reporting the list) and watch it on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("EtcdResolver.start() called twice")
        self._listener = listener
        if self.start_timeout > 0:
            try:
                self._list(self.start_timeout)
            except ClientClosed:
                return
            except Exception as exc:
                self._failed(exc)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rpcframe-etcd {self.prefix}")
        self._thread.start()

    def close(self) -> None:
        """Stop watching; returns promptly, and no listener call follows."""
        self._stop.set()
        self._client.abort()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
        with self._push_lock:  # waits out a listener call in progress
            self._listener = None

    # -- the background thread --

    def _run(self) -> None:
        delay = MIN_BACKOFF
        while not self._stop.is_set():
            self._watching_since = None
            try:
                if not self._listed:
                    self._list(self.timeout)
                self._watch()
                continue  # ended cleanly (silent a while, compacted): watch again at once
            except ClientClosed:
                return
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._failed(exc)
            since = self._watching_since
            if since is not None and time.monotonic() - since > _STABLE:
                delay = MIN_BACKOFF  # the watch had held: a new outage starts with short retries
            self._client.rotate()
            if self._stop.wait(jittered(delay)):
                return
            delay = min(delay * 2, self.max_backoff)

    def _failed(self, exc: BaseException) -> None:
        current = self._current
        kept = "no endpoints yet" if current is None else f"{len(current)} endpoint{'' if len(current) == 1 else 's'}"
        self._health.failed(self._client.url, exc, f"keeping the last list ({kept}), retrying")

    def _list(self, timeout: float) -> None:
        """Read the whole prefix; the watch then starts after its revision."""
        answer = self._client.call("/v3/kv/range", self._range, timeout)
        header = answer.get("header", {})
        kvs: dict[bytes, tuple[bytes, Endpoint | None]] = {}
        for kv in answer.get("kvs", ()):
            key, raw = unb64(kv["key"]), unb64(kv.get("value", ""))
            kvs[key] = self._parsed(key, raw)
        self._kvs = kvs
        self._revision = int(header.get("revision", 0))
        self._cluster = str(header.get("cluster_id", ""))
        self._listed = True
        self._health.ok(self._client.url, f"re-read {self.prefix} at revision {self._revision}")
        self._push()

    def _watch(self) -> None:
        """Watch from the revision after the last one seen, applying changes.

        Returns when the watch ends cleanly (silent for ``watch_timeout``,
        compacted, a different history): the caller watches again. Raises
        when etcd fails or the stream breaks.
        """
        create = {**self._range, "start_revision": str(self._revision + 1), "progress_notify": True}
        stream = self._client.stream("/v3/watch", {"create_request": create}, self.watch_timeout)
        try:
            for result in stream:
                if self._stop.is_set():
                    return
                header = result.get("header", {})
                if result.get("created"):
                    if not self._same_history(header):
                        return
                    self._watching_since = time.monotonic()
                    self._health.ok(self._client.url, f"watching {self.prefix} from revision {self._revision + 1}")
                elif result.get("canceled"):
                    compacted = int(result.get("compact_revision", 0))
                    if not compacted:
                        raise EtcdError(f"watch canceled: {result.get('cancel_reason') or 'no reason given'}")
                    LOG.info(
                        "etcd compacted its history to revision %d, past revision %d where the watch of %s "
                        "stood; re-reading the prefix",
                        compacted, self._revision, self.prefix,
                    )  # fmt: skip
                    self._listed = False
                    return
                elif result.get("events"):
                    self._apply(result["events"])
                    self._push()
                else:
                    # A progress notification: every change up to this revision was sent.
                    self._revision = max(self._revision, int(header.get("revision", 0)))
        except WatchIdle:
            if self._watching_since is None:  # not even "created": etcd is stuck, not idle
                raise EtcdError(f"no answer to the watch request within {self.watch_timeout} s") from None
            return
        finally:
            stream.close()
        raise EtcdError("the watch stream ended")

    def _same_history(self, header: Mapping[str, Any]) -> bool:
        """False (and a re-read is due) when etcd's history is not the one we followed.

        A restored backup or a new cluster at the same address can be behind
        the revision we hold: watching "from revision N+1" there would wait
        for changes that already exist.
        """
        revision, cluster = int(header.get("revision", 0)), str(header.get("cluster_id", ""))
        if revision >= self._revision and (not self._cluster or not cluster or cluster == self._cluster):
            return True
        LOG.warning(
            "etcd %s: history changed (cluster %s revision %d, had cluster %s revision %d); re-reading %s",
            self._client.url, cluster, revision, self._cluster, self._revision, self.prefix,
        )  # fmt: skip
        self._listed = False
        return False

    def _apply(self, events: Sequence[JSONObject]) -> None:
        for event in events:
            kv = event.get("kv", {})
            key = unb64(kv["key"])
            if event.get("type") in ("DELETE", 1):  # a delete or an expired lease
                self._kvs.pop(key, None)
            else:
                self._kvs[key] = self._parsed(key, unb64(kv.get("value", "")))
            self._revision = max(self._revision, int(kv.get("mod_revision", 0)))

    def _parsed(self, key: bytes, raw: bytes) -> tuple[bytes, Endpoint | None]:
        known = self._kvs.get(key)
        if known is not None and known[0] == raw:
            return known
        return raw, endpoint_from_value(raw, key.decode(errors="replace"))

    def _push(self) -> None:
        endpoints: list[Endpoint] = []
        seen: set[str] = set()
        for key in sorted(self._kvs):
            endpoint = self._kvs[key][1]
            if endpoint is not None and endpoint.address not in seen:  # two keys, one backend: once
                seen.add(endpoint.address)
                endpoints.append(endpoint)
        new = tuple(endpoints)
        if new == self._current:
            return
        with self._push_lock:
            listener = self._listener
            if self._stop.is_set() or listener is None:
                return
            self._current = new
            try:
                listener(new)
            except Exception:
                LOG.exception("endpoint listener of %s failed", self.prefix)

    def __repr__(self) -> str:
        return f"EtcdResolver({self._client.url!r}, {self.prefix!r})"


def resolver_factory(target: str, refresh: float) -> EtcdResolver:
    """The ``etcd`` scheme's factory (see :func:`rpcframe.register_resolver`).

    ``refresh`` is unused: etcd pushes every change through the watch.
    """
    del refresh
    return EtcdResolver.from_target(target)
