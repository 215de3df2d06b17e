"""Service discovery through etcd: a watching resolver and a leased registration.

Backends register themselves under a prefix, one key each, with a lease that
they keep alive; clients list the prefix and watch it::

    /services/echo/a  ->  {"address": "10.0.0.1:50051", "weight": 2, "metadata": {"zone": "a"}}
    /services/echo/b  ->  10.0.0.2:50051                 (a bare host:port works too)

:class:`EtcdResolver` pushes the endpoint list on every change (key added,
value changed, key deleted, lease expired); :class:`EtcdRegistration` puts a
key with a lease and keeps it alive, and revokes it on ``close()`` so that
clients drop the endpoint at once rather than after the TTL.

Both speak etcd's v3 JSON gateway (``/v3/kv/range``, ``/v3/watch``,
``/v3/lease/*``; keys and values base64) with ``http.client`` on a daemon
thread, so discovery adds no dependency. etcd 3.4 or later (``/v3`` paths).

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

import base64
import contextlib
import http.client
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from .endpoint import Endpoint
from .resolver import Listener

__all__ = ["EtcdError", "EtcdRegistration", "EtcdResolver", "endpoint_from_value", "endpoint_value"]

_LOG = logging.getLogger("rpcframe.discovery")

DEFAULT_ENDPOINTS = "127.0.0.1:2379"
#: First retry delay after a failure (seconds); doubles up to ``max_backoff``.
_MIN_BACKOFF = 0.1
#: A watch that held this long (seconds) resets the backoff when it breaks;
#: one that breaks sooner keeps backing off, so a flapping etcd is not hammered.
_STABLE = 1.0
#: How long ``close()`` waits for a background thread (it is a daemon either way).
_JOIN_TIMEOUT = 2.0
_JSON_HEADERS = {"Content-Type": "application/json"}
#: grpc status etcd reports for an unknown lease (revoking an expired one is fine).
_NOT_FOUND = 5

JSONObject = dict[str, Any]


class EtcdError(OSError):
    """etcd answered with an error (``code`` is its gRPC status code, 0 when unknown).

    An ``OSError``, so that ``except OSError`` covers both etcd's refusals and
    the network errors of reaching it.
    """

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


# -- values -------------------------------------------------------------------


def endpoint_from_value(value: bytes | str, key: str = "?") -> Endpoint | None:
    """The endpoint a registry value describes, or None when it describes none.

    ``value`` is JSON -- ``{"address": "host:port", "weight": 1, "zone": "a",
    "metadata": {"zone": "a"}}``, only ``address`` required -- or a bare
    ``host:port`` (also ``unix:path``). ``zone`` defaults to
    ``metadata["zone"]``. A value that is neither is logged (naming ``key``)
    and ignored: one bad registration must not hide the good ones.
    """
    try:
        text = value.decode() if isinstance(value, bytes) else value
        return _parse_value(text.strip())
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        _LOG.warning("etcd key %s ignored: %s (value %.80r)", key, exc, value)
        return None


def _parse_value(text: str) -> Endpoint:
    if not text:
        raise ValueError("empty value")
    data: object = json.loads(text) if text[0] in '{["' else text
    if isinstance(data, str):
        return Endpoint(_check_address(data))
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object with "address", or host:port')
    address = data.get("address")
    if not isinstance(address, str):
        raise ValueError('"address" must be a string host:port')
    weight = data.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f'"weight" must be an integer >= 1, not {weight!r}')
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError('"metadata" must be an object')
    pairs: list[tuple[str, str]] = []
    for name, item in metadata.items():
        if isinstance(item, dict | list) or item is None:
            raise ValueError(f"metadata {name!r} must be a string or number")
        pairs.append((name, item if isinstance(item, str) else json.dumps(item)))
    zone = data.get("zone", metadata.get("zone", ""))
    if not isinstance(zone, str):
        raise ValueError('"zone" must be a string')
    return Endpoint(_check_address(address), weight=weight, zone=zone, metadata=tuple(sorted(pairs)))


def _check_address(address: str) -> str:
    address = address.strip()
    if address.startswith(("unix:", "unix-abstract:")) and len(address.partition(":")[2]) > 0:
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in " ,/"):
        raise ValueError(f"{address!r} is not host:port")
    return address


def endpoint_value(endpoint: Endpoint | str | Mapping[str, Any]) -> str:
    """The registry value (JSON) for an endpoint, an address or a mapping."""
    if isinstance(endpoint, str):
        data: dict[str, Any] = {"address": _check_address(endpoint)}
    elif isinstance(endpoint, Endpoint):
        data = {"address": endpoint.address, "weight": endpoint.weight}
        if endpoint.zone:
            data["zone"] = endpoint.zone
        if endpoint.metadata:
            data["metadata"] = dict(endpoint.metadata)
    else:
        data = dict(endpoint)
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if endpoint_from_value(text, "(new registration)") is None:
        raise ConfigError(f"{endpoint!r} does not describe an endpoint (see the log)")
    return text


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for every key starting with ``prefix``.

    The prefix with its last byte incremented (trailing 0xff bytes dropped);
    ``b"\\0"`` (every key) when no byte can be incremented.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


# -- the HTTP client ----------------------------------------------------------


class _Closed(Exception):
    """The owner closed the client: the background thread must return."""


class _Idle(Exception):
    """The watch stream said nothing for ``watch_timeout`` s (re-created, not an error)."""


def _parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, str, int]]:
    """(scheme, host, port) of each etcd endpoint (``host:port`` or an http(s) URL)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        try:
            port = url.port or 2379
        except ValueError:
            port = -1
        if url.scheme not in ("http", "https") or not url.hostname or port < 0 or url.netloc.endswith(":"):
            raise ConfigError(f"{item!r}: an etcd endpoint is host:port, http://host:port or https://host:port")
        parsed.append((url.scheme, url.hostname, port))
    if not parsed:
        raise ConfigError("at least one etcd endpoint is needed")
    return parsed


class _Client:
    """POSTs to etcd's JSON gateway, one short-lived connection per request.

    ``abort()`` (from any thread) shuts down the connections in use, so a
    thread blocked in a read returns at once; a client never reconnects after
    it. A failed request should be followed by ``rotate()``, which moves on to
    the next etcd endpoint.
    """

    def __init__(self, endpoints: str | Sequence[str], timeout: float, ssl_context: ssl.SSLContext | None) -> None:
        self._endpoints = _parse_endpoints(endpoints)
        self._index = 0
        self.timeout = timeout
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._active: set[http.client.HTTPConnection] = set()
        self._closed = False

    @property
    def count(self) -> int:
        """How many etcd endpoints there are to try."""
        return len(self._endpoints)

    @property
    def url(self) -> str:
        """The etcd endpoint requests go to now."""
        scheme, host, port = self._endpoints[self._index]
        return f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"

    def rotate(self) -> None:
        """Use the next etcd endpoint for the next request."""
        self._index = (self._index + 1) % len(self._endpoints)

    def abort(self) -> None:
        """Refuse new requests and break the ones in progress."""
        with self._lock:
            self._closed = True
            active = list(self._active)
        for conn in active:
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)

    def _open(self, timeout: float) -> http.client.HTTPConnection:
        scheme, host, port = self._endpoints[self._index]
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._ssl or ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        with self._lock:
            if self._closed:
                raise _Closed
            self._active.add(conn)
        try:
            conn.connect()
            # abort() may have run while connect() had no socket to shut down;
            # it set _closed first, so checking after connecting cannot miss it.
            if self._closed:
                raise _Closed
        except BaseException:
            self._release(conn)
            raise
        return conn

    def _release(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        with self._lock:
            self._active.discard(conn)

    def call(self, path: str, body: JSONObject, timeout: float | None = None) -> JSONObject:
        """One request; the decoded answer (``result`` unwrapped), or EtcdError."""
        conn = self._open(self.timeout if timeout is None else timeout)
        try:
            conn.request("POST", path, body=json.dumps(body), headers=_JSON_HEADERS)
            response = conn.getresponse()
            data = response.read()
        finally:
            self._release(conn)
        return _decode(path, response.status, data)

    def stream(self, path: str, body: JSONObject, idle_timeout: float) -> Generator[JSONObject, None, None]:
        """A streaming request (``/v3/watch``): its JSON lines, ``result`` unwrapped.

        Ends at the end of the stream; raises :class:`_Idle` when nothing came
        for ``idle_timeout`` s. Close the iterator to end the request.
        """
        conn = self._open(self.timeout)
        try:
            conn.request("POST", path, body=json.dumps(body), headers=_JSON_HEADERS)
            response = conn.getresponse()
            if response.status != 200:
                _decode(path, response.status, response.read())
            if conn.sock is not None:
                conn.sock.settimeout(idle_timeout)
            while True:
                try:
                    line = response.readline()
                except TimeoutError:
                    raise _Idle from None
                if not line:
                    return
                if line.strip():
                    yield _decode(path, 200, line)
        finally:
            self._release(conn)


def _decode(path: str, status: int, data: bytes) -> JSONObject:
    try:
        answer = json.loads(data)
    except ValueError:
        raise EtcdError(f"{path}: HTTP {status}, not JSON: {data[:200]!r}") from None
    if not isinstance(answer, dict):
        raise EtcdError(f"{path}: HTTP {status}, unexpected answer {data[:200]!r}")
    error = answer.get("error")
    if error is not None or status != 200:
        # Unary errors are {"error": "...", "code": N, "message": "..."}; a
        # stream's are wrapped as {"error": {"grpc_code": N, "message": ...}}.
        detail = error if isinstance(error, dict) else answer
        message = detail.get("message") or str(error or f"HTTP {status}")
        code = detail.get("code", detail.get("grpc_code", 0))
        raise EtcdError(f"{path}: {message}", code if isinstance(code, int) else 0)
    result = answer.get("result", answer)
    return result if isinstance(result, dict) else answer


class _Health:
    """Logs reachability changes once (not every retry) and keeps the last error."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.healthy: bool | None = None
        self.last_error: str | None = None

    def failed(self, url: str, exc: BaseException, consequence: str) -> None:
        self.last_error = f"{url}: {exc}"
        if self.healthy is not False:
            # Network and etcd errors speak for themselves; anything else may be a bug: show where.
            trace = None if isinstance(exc, _EXPECTED) else exc
            _LOG.warning("etcd %s unreachable for %s (%s); %s", url, self.what, exc, consequence, exc_info=trace)
        else:
            _LOG.debug("etcd %s still unreachable for %s (%s)", url, self.what, exc)
        self.healthy = False

    def ok(self, url: str, news: str) -> None:
        if self.healthy is False:
            _LOG.info("etcd %s reachable again for %s; %s", url, self.what, news)
        self.healthy = True
        self.last_error = None


def _backoff(delay: float) -> float:
    # Jitter keeps many clients of a restarted etcd from retrying in lockstep.
    return delay * random.uniform(0.5, 1.0)


#: Failures of etcd or of the network. The background threads retry on any
#: exception (a thread that died would freeze the endpoint list silently).
_EXPECTED = (OSError, http.client.HTTPException)


# -- the resolver -------------------------------------------------------------


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
        self._range = {"key": _b64(self._key), "range_end": _b64(prefix_range_end(self._key))}
        self._client = _Client(endpoints, timeout, ssl_context)
        self._health = _Health(f"prefix {prefix}")
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
            except _Closed:
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
            thread.join(_JOIN_TIMEOUT)
        with self._push_lock:  # waits out a listener call in progress
            self._listener = None

    # -- the background thread --

    def _run(self) -> None:
        delay = _MIN_BACKOFF
        while not self._stop.is_set():
            self._watching_since = None
            try:
                if not self._listed:
                    self._list(self.timeout)
                self._watch()
                continue  # ended cleanly (silent a while, compacted): watch again at once
            except _Closed:
                return
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._failed(exc)
            since = self._watching_since
            if since is not None and time.monotonic() - since > _STABLE:
                delay = _MIN_BACKOFF  # the watch had held: a new outage starts with short retries
            self._client.rotate()
            if self._stop.wait(_backoff(delay)):
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
            key, raw = _unb64(kv["key"]), _unb64(kv.get("value", ""))
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
                    _LOG.info(
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
        except _Idle:
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
        _LOG.warning(
            "etcd %s: history changed (cluster %s revision %d, had cluster %s revision %d); re-reading %s",
            self._client.url, cluster, revision, self._cluster, self._revision, self.prefix,
        )  # fmt: skip
        self._listed = False
        return False

    def _apply(self, events: Sequence[JSONObject]) -> None:
        for event in events:
            kv = event.get("kv", {})
            key = _unb64(kv["key"])
            if event.get("type") in ("DELETE", 1):  # a delete or an expired lease
                self._kvs.pop(key, None)
            else:
                self._kvs[key] = self._parsed(key, _unb64(kv.get("value", "")))
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
                _LOG.exception("endpoint listener of %s failed", self.prefix)

    def __repr__(self) -> str:
        return f"EtcdResolver({self._client.url!r}, {self.prefix!r})"


# -- the registration ---------------------------------------------------------


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
        self._client = _Client(endpoints, timeout, ssl_context)
        self._health = _Health(f"lease of {key}")
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
                if exc.code != _NOT_FOUND:
                    raise
                # The lease just expired: the thread grants a new one and puts this value.

    def _register(self) -> None:
        with self._lock:
            answer = self._client.call("/v3/lease/grant", {"TTL": self.ttl})
            self.lease_id = int(answer["ID"])
            self._put()

    def _put(self) -> None:
        body = {"key": _b64(self.key.encode()), "value": _b64(self.value.encode()), "lease": str(self.lease_id)}
        self._client.call("/v3/kv/put", body)

    def _run(self) -> None:
        interval = self.ttl / 3  # two refreshes may fail before the lease lapses
        delay = _MIN_BACKOFF
        wait = interval
        while not self._stop.wait(wait):
            try:
                if self.lease_id == 0:
                    self._register()
                else:
                    answer = self._client.call("/v3/lease/keepalive", {"ID": str(self.lease_id)})
                    if int(answer.get("TTL", 0)) <= 0:  # etcd forgot the lease: it expired
                        _LOG.warning("etcd lease of %s expired; registering it again", self.key)
                        self.lease_id = 0
                        self._register()
                self._health.ok(self._client.url, f"lease {self.lease_id} refreshed")
                delay, wait = _MIN_BACKOFF, interval
            except _Closed:
                return
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._health.failed(self._client.url, exc, f"retrying (the lease lasts {self.ttl} s)")
                self._client.rotate()
                wait = min(_backoff(delay), interval)
                delay = min(delay * 2, interval)

    def close(self, revoke: bool = True) -> None:
        """Stop refreshing the lease and (unless ``revoke=False``) revoke it now."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._client.abort()
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT)
        if revoke and self.lease_id:
            self._revoke()

    def _revoke(self) -> None:
        client = _Client(self._etcd, self.timeout, self._ssl)  # the thread's client is aborted
        deadline = time.monotonic() + self.timeout
        error: Exception = EtcdError("no etcd endpoint tried")
        for _ in range(client.count):
            try:
                client.call("/v3/lease/revoke", {"ID": str(self.lease_id)}, max(0.1, deadline - time.monotonic()))
                return
            except EtcdError as exc:
                if exc.code == _NOT_FOUND:  # already expired: nothing left to remove
                    return
                error = exc
            except Exception as exc:
                error = exc
            client.rotate()
            if time.monotonic() >= deadline:
                break
        _LOG.warning("could not revoke the etcd lease of %s (%s); the key goes in %d s", self.key, error, self.ttl)

    def __enter__(self) -> EtcdRegistration:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EtcdRegistration({self._client.url!r}, {self.key!r}, lease={self.lease_id})"
