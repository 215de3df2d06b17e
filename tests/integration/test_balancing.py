"""Per-call balancing and failover over real backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.balancing.resolver import ManualResolver
from tests.conftest import eventually, run_in_thread, wait_until
from tests.servicers import AioScriptedEcho, Backend

REPO = Path(__file__).resolve().parents[2]
WHOAMI = pb.EchoRequest(message="whoami")


def _config(policy: str, **kwargs: object) -> rpcframe.ChannelConfig:
    return rpcframe.ChannelConfig(policy=policy, slow_start=0, default_timeout=10, **kwargs)  # type: ignore[arg-type]


def _ready(channel: rpcframe.Channel, count: int) -> None:
    wait_until(lambda: sum(state == "READY" for _, state in channel.endpoints()) == count)


def _spread(stub: echo_pb2_grpc.EchoServiceStub, n: int) -> collections.Counter[str]:
    return collections.Counter(stub.Echo(WHOAMI).message for _ in range(n))


def _targets(backends: list[Backend]) -> list[str]:
    return [b.address for b in backends]


def test_round_robin_spreads_evenly(backends: list[Backend]) -> None:
    with rpcframe.connect(_targets(backends), _config("round_robin")) as channel:
        _ready(channel, 3)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert _spread(stub, 30) == {"a": 10, "b": 10, "c": 10}


@pytest.mark.parametrize("policy", ["least_request", "peak_ewma", "filtered_p2c"])
def test_p2c_policies_use_every_backend_under_concurrency(backends: list[Backend], policy: str) -> None:
    with rpcframe.connect(",".join(_targets(backends)), _config(policy)) as channel:
        _ready(channel, 3)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        # Concurrent callers make in-flight counts differ, which both policies weigh.
        workers = [run_in_thread(lambda: _spread(stub, 50)) for _ in range(8)]
        counts: collections.Counter[str] = collections.Counter()
        for thread, out in workers:
            thread.join(30)
            counts.update(out[0])  # type: ignore[arg-type]
        assert set(counts) == {"a", "b", "c"}
        assert sum(counts.values()) == 400


def test_pick_first_uses_first(backends: list[Backend]) -> None:
    with rpcframe.connect(_targets(backends), _config("pick_first")) as channel:
        _ready(channel, 3)
        assert _spread(channel.stub(echo_pb2_grpc.EchoServiceStub), 10) == {"a": 10}


def test_peak_ewma_avoids_slow_backend(backends: list[Backend]) -> None:
    with rpcframe.connect(_targets(backends), _config("peak_ewma")) as channel:
        _ready(channel, 3)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        a = next(e.stats for e in channel.balancer.entries() if e.stats.address == backends[0].address)
        a.ewma.observe(5.0, time.monotonic())  # as if a had just taken 5 s
        counts = _spread(stub, 200)
        assert counts["a"] < 20  # P2C only picks a when it draws a twice... which it cannot
        assert counts["b"] + counts["c"] > 180


def test_health_not_serving_takes_backend_out_and_back(backends: list[Backend]) -> None:
    with rpcframe.connect(_targets(backends), _config("round_robin", panic_threshold=0.0)) as channel:
        _ready(channel, 3)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        backends[1].server.set_serving("", False)
        wait_until(lambda: dict(channel.endpoints())[backends[1].address] == "NOT_SERVING")
        assert set(_spread(stub, 30)) == {"a", "c"}
        backends[1].server.set_serving("", True)
        wait_until(lambda: dict(channel.endpoints())[backends[1].address] == "READY")
        assert set(_spread(stub, 30)) == {"a", "b", "c"}


def test_failing_backend_is_ejected_and_calls_fail_over(backends: list[Backend]) -> None:
    outlier = rpcframe.OutlierConfig(consecutive_failures=3, base_ejection_time=60)
    with rpcframe.connect(_targets(backends), _config("round_robin", outlier=outlier)) as channel:
        _ready(channel, 3)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        backends[0].servicer.failing = True
        # Echo is NO_SIDE_EFFECTS, so UNAVAILABLE answers fail over: no call fails.
        assert set(_spread(stub, 60)) == {"b", "c"}
        failed_calls = backends[0].servicer.calls
        assert failed_calls == 3  # ejected after the threshold, then never picked
        assert "ejected" in dict(channel.endpoints())[backends[0].address]


def test_resolver_update_keeps_in_flight_calls(backends: list[Backend]) -> None:
    resolver = ManualResolver([backends[0].address])
    with rpcframe.connect(resolver, _config("round_robin")) as channel:
        _ready(channel, 1)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        in_flight = stub.Echo.future(pb.EchoRequest(message="block"))
        assert backends[0].servicer.started.wait(5)
        resolver.update([backends[1].address, backends[2].address])
        _ready(channel, 2)
        assert set(_spread(stub, 20)) == {"b", "c"}
        backends[0].servicer.release.set()
        assert in_flight.result(timeout=5).message == "block"  # not dropped by the removal


def test_all_backends_down_fails_fast_naming_target(backends: list[Backend]) -> None:
    with rpcframe.connect(_targets(backends), _config("round_robin", health_check=False)) as channel:
        _ready(channel, 3)
        for backend in backends:
            backend.stop()
        wait_until(lambda: all(s == "TRANSIENT_FAILURE" for _, s in channel.endpoints()), timeout=10)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        started = time.monotonic()
        with pytest.raises(rpcframe.Unavailable) as info:
            stub.Echo(WHOAMI)
        assert time.monotonic() - started < 2  # fast, not a wait for the 10 s timeout
        assert backends[0].address in info.value.details()
        assert "TRANSIENT_FAILURE" in info.value.details()
        with pytest.raises(rpcframe.DeadlineExceeded):
            stub.Echo(WHOAMI, timeout=0.3, wait_for_ready=True)


def test_streams_are_balanced(backends: list[Backend]) -> None:
    with rpcframe.connect(_targets(backends), _config("round_robin")) as channel:
        _ready(channel, 3)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(6):
            assert len(list(stub.Expand(pb.ExpandRequest(message="s", count=2)))) == 2
        stats = {e.stats.address: e.stats.inflight for e in channel.balancer.entries()}
        assert set(stats.values()) == {0}  # every stream released its pick


class ServeProcess:
    """A backend in its own process (so it can be killed with SIGKILL)."""

    def __init__(self, name: str, factory: str = "tests.servicers:tagged") -> None:
        env = {**os.environ, "RPCFRAME_SERVER_ID": name}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rpcframe", "serve", factory, "--bind", "127.0.0.1:0", "--log-level", "WARNING"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.fullmatch(r"serving on (\S+)\n", line)
        assert match, line
        self.address = match.group(1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.mark.slow
def test_killed_backend_under_load_no_failed_calls() -> None:
    procs = [ServeProcess(n) for n in ("a", "b", "c")]
    try:
        with rpcframe.connect([p.address for p in procs], _config("peak_ewma")) as channel:
            _ready(channel, 3)
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            stop = threading.Event()
            counts: collections.Counter[str] = collections.Counter()
            errors: list[BaseException] = []

            def load() -> None:
                end = time.monotonic() + 20  # bounded even if the test fails
                while not stop.is_set() and time.monotonic() < end:
                    try:
                        counts[stub.Echo(WHOAMI, timeout=5).message] += 1
                    except rpcframe.RpcError as exc:
                        errors.append(exc)

            workers = [run_in_thread(load)[0] for _ in range(4)]
            wait_until(lambda: sum(counts.values()) > 200)
            procs[0].kill()
            after_kill = counts["a"]
            wait_until(lambda: dict(channel.endpoints())[procs[0].address] != "READY")
            wait_until(lambda: sum(counts.values()) > 600)
            stop.set()
            for worker in workers:
                worker.join(10)
            assert errors == []
            assert counts["a"] <= after_kill + 8  # at most the calls already in flight
            assert counts["b"] > 0
            assert counts["c"] > 0
    finally:
        for p in procs:
            p.kill()


async def test_aio_balancing_and_health() -> None:
    servicers = [AioScriptedEcho(n) for n in ("a", "b")]
    servers = []
    for servicer in servicers:
        server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1))
        server.add(servicer)
        port = server.bind("127.0.0.1:0")
        await server.start()
        servers.append((server, f"127.0.0.1:{port}"))
    try:
        config = _config("round_robin", panic_threshold=0.0)
        async with rpcframe.aio.connect([a for _, a in servers], config) as channel:

            async def ready(n: int) -> bool:
                return sum(s == "READY" for _, s in channel.endpoints()) == n

            await eventually(lambda: ready(2))
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            got = collections.Counter([(await stub.Echo(WHOAMI)).message for _ in range(10)])
            assert got == {"a": 5, "b": 5}
            await servers[0][0].set_serving("", False)
            await eventually(lambda: ready(1))
            got = collections.Counter([(await stub.Echo(WHOAMI)).message for _ in range(10)])
            assert got == {"b": 10}
            await servers[1][0].stop(0)
            await servers[0][0].stop(0)

            async def down() -> bool:
                return all(s == "TRANSIENT_FAILURE" for _, s in channel.endpoints())

            await eventually(down, within=10)
            with pytest.raises(rpcframe.Unavailable, match="no ready endpoint"):
                await stub.Echo(WHOAMI)
    finally:
        for server, _ in servers:
            await server.stop(0)


@pytest.mark.slow
async def test_aio_killed_backend_under_load() -> None:
    procs = [ServeProcess(n, "tests.servicers:aio_tagged") for n in ("a", "b", "c")]
    try:
        async with rpcframe.aio.connect([p.address for p in procs], _config("peak_ewma")) as channel:

            async def ready() -> bool:
                return sum(s == "READY" for _, s in channel.endpoints()) == 3

            await eventually(ready)
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            counts: collections.Counter[str] = collections.Counter()

            async def burst(n: int) -> None:
                replies = await asyncio.gather(*(stub.Echo(WHOAMI, timeout=5) for _ in range(n)))
                counts.update(r.message for r in replies)

            await burst(90)
            killer = asyncio.get_running_loop().run_in_executor(None, procs[1].kill)
            for _ in range(10):
                await burst(30)  # an error in any call would raise here
            await killer
            for _ in range(5):
                await burst(30)
            assert sum(counts.values()) == 90 + 450
            assert set(counts) == {"a", "b", "c"}
    finally:
        for p in procs:
            p.kill()


class _DelayedEcho(echo_pb2_grpc.EchoServiceServicer):
    """Answers its name after a fixed delay (asyncio sleep: calls overlap)."""

    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay
        self.calls = 0

    async def Echo(self, request: pb.EchoRequest, context: object) -> pb.EchoResponse:  # type: ignore[override]
        self.calls += 1
        await asyncio.sleep(self.delay)
        return pb.EchoResponse(message=self.name)


async def test_default_policy_gives_slow_backend_a_small_share() -> None:
    # d answers in 200 ms, the others in 2 ms: round robin would send it a quarter of the calls.
    servicers = [_DelayedEcho("a", 0.002), _DelayedEcho("b", 0.002), _DelayedEcho("c", 0.002), _DelayedEcho("d", 0.2)]
    servers = []
    for servicer in servicers:
        # No admission control: shedding d's calls would hide what the balancer does.
        server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=0, overload=None))
        server.add(servicer)
        port = server.bind("127.0.0.1:0")
        await server.start()
        servers.append((server, f"127.0.0.1:{port}"))
    try:
        config = rpcframe.ChannelConfig(slow_start=0, default_timeout=10)
        assert config.policy == "filtered_p2c"
        async with rpcframe.aio.connect([a for _, a in servers], config) as channel:

            async def ready() -> bool:
                return sum(s == "READY" for _, s in channel.endpoints()) == 4

            await eventually(ready)
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            counts: collections.Counter[str] = collections.Counter()

            async def caller() -> None:
                for _ in range(40):
                    counts[(await stub.Echo(WHOAMI)).message] += 1

            await asyncio.gather(*(caller() for _ in range(16)))
            assert sum(counts.values()) == 640
            # The first 16 calls go out before any answer (4 may reach d), then d is left out.
            assert counts["d"] <= 10
            assert min(counts[n] for n in "abc") > 150
    finally:
        for server, _ in servers:
            await server.stop(0)
