"""etcd's v3 JSON gateway, as the etcd resolver and registration use it.

- the registry's value format: :func:`endpoint_from_value` reads a key's
  value, :func:`endpoint_value` writes one;
- :class:`GatewayClient`: POSTs to ``/v3/...`` with ``http.client`` (keys and
  values base64), one short-lived connection per request, over the
  configured etcd endpoints in turn;
- :class:`Reachability`: logs each reachability change once;
- :class:`EtcdError`: what etcd answered when it refused.

Nothing here needs a dependency beyond the standard library, and nothing
imports it until an ``etcd://`` target or an :class:`~rpcframe.EtcdRegistration`
is used.
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
from collections.abc import Generator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .._core.errors import ConfigError
from ..balancing.endpoint import Endpoint

__all__ = [
    "DEFAULT_ENDPOINTS",
    "ClientClosed",
    "EtcdError",
    "GatewayClient",
    "Reachability",
    "WatchIdle",
    "b64",
    "jittered",
    "endpoint_from_value",
    "endpoint_value",
    "prefix_range_end",
    "unb64",
]

LOG = logging.getLogger("rpcframe.discovery")

DEFAULT_ENDPOINTS = "127.0.0.1:2379"
#: First retry delay after a failure (seconds); doubles up to ``max_backoff``.
MIN_BACKOFF = 0.1
#: How long ``close()`` waits for a background thread (it is a daemon either way).
JOIN_TIMEOUT = 2.0
_JSON_HEADERS = {"Content-Type": "application/json"}
#: grpc status etcd reports for an unknown lease (revoking an expired one is fine).
NOT_FOUND = 5

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
        LOG.warning("etcd key %s ignored: %s (value %.80r)", key, exc, value)
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


def b64(data: bytes) -> str:
    """``data`` as the gateway's JSON carries bytes."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """The bytes a gateway JSON string carries."""
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


class ClientClosed(Exception):
    """The owner closed the client: the background thread must return."""


class WatchIdle(Exception):
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


class GatewayClient:
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
                raise ClientClosed
            self._active.add(conn)
        try:
            conn.connect()
            # abort() may have run while connect() had no socket to shut down;
            # it set _closed first, so checking after connecting cannot miss it.
            if self._closed:
                raise ClientClosed
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

        Ends at the end of the stream; raises :class:`WatchIdle` when nothing came
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
                    raise WatchIdle from None
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


#: Failures of etcd or of the network. The background threads retry on any
#: exception (a thread that died would freeze the endpoint list silently).
_EXPECTED = (OSError, http.client.HTTPException)


class Reachability:
    """Logs reachability changes once (not every retry) and keeps the last error."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.healthy: bool | None = None
        self.last_error: str | None = None

    def failed(self, url: str, exc: BaseException, consequence: str) -> None:
        """Record a failure; log it if etcd was reachable until now."""
        self.last_error = f"{url}: {exc}"
        if self.healthy is not False:
            # Network and etcd errors speak for themselves; anything else may be a bug: show where.
            trace = None if isinstance(exc, _EXPECTED) else exc
            LOG.warning("etcd %s unreachable for %s (%s); %s", url, self.what, exc, consequence, exc_info=trace)
        else:
            LOG.debug("etcd %s still unreachable for %s (%s)", url, self.what, exc)
        self.healthy = False

    def ok(self, url: str, news: str) -> None:
        """Record a success; log ``news`` if etcd was unreachable until now."""
        if self.healthy is False:
            LOG.info("etcd %s reachable again for %s; %s", url, self.what, news)
        self.healthy = True
        self.last_error = None


def jittered(delay: float) -> float:
    """A retry delay between half of ``delay`` and ``delay``."""
    # Jitter keeps many clients of a restarted etcd from retrying in lockstep.
    return delay * random.uniform(0.5, 1.0)
