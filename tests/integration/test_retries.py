"""Retries, budgets, chain stop, pushback and hedging against real servers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import wait_until
from tests.servicers import Backend, ScriptedEcho

ECHO = "rpcframe.echo.v1.EchoService/Echo"


@pytest.fixture
def echoes() -> Iterator[list[Backend]]:
    started = [Backend(ScriptedEcho(name)) for name in "abc"]
    yield started
    for backend in started:
        backend.servicer.release.set()
        backend.stop()


def _config(**kwargs: Any) -> rpcframe.ChannelConfig:
    kwargs.setdefault("policy", "round_robin")
    return rpcframe.ChannelConfig(slow_start=0, default_timeout=10, **kwargs)


def _connect(backends: list[Backend], **kwargs: Any) -> rpcframe.Channel:
    channel = rpcframe.connect([b.address for b in backends], _config(**kwargs))
    wait_until(lambda: sum(state == "READY" for _, state in channel.endpoints()) == len(backends))
    return channel


def _calls(backends: list[Backend]) -> list[int]:
    return [b.servicer.calls for b in backends]


def test_idempotent_call_is_retried_on_another_endpoint(echoes: list[Backend]) -> None:
    echoes[0].servicer.failing = True
    with _connect(echoes) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        answers = [stub.Echo(pb.EchoRequest(message="whoami")).message for _ in range(30)]
        assert "a" not in answers
        assert len(answers) == 30
        assert channel.stats.retries == echoes[0].servicer.calls > 0


def test_retry_budget_caps_extra_attempts(echoes: list[Backend]) -> None:
    for backend in echoes:
        backend.servicer.failing = True
    budget = rpcframe.BudgetConfig(ratio=0.0, min_per_second=0.2, ttl=10)  # 2 retries per 10 s
    with _connect(echoes, retry_budget=budget) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(5):
            with pytest.raises(rpcframe.Unavailable):
                stub.Echo(pb.EchoRequest(message="x"))
        assert sum(_calls(echoes)) == 5 + 2
        assert channel.stats.retries == 2
        assert channel.stats.budget_refused >= 3


def test_non_retryable_status_is_not_retried(echoes: list[Backend]) -> None:
    with _connect(echoes) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(rpcframe.NotFound):
            stub.Echo(pb.EchoRequest(message="raise:NotFound:gone"))
        assert sum(_calls(echoes)) == 1
        assert channel.stats.retries == 0


class Recorder(bench_pb2_grpc.BenchServiceServicer):
    """Record has a side effect; ``mode`` makes it fail after recording."""

    def __init__(self) -> None:
        self.records: dict[str, int] = {}
        self.mode = ""
        self.inside = threading.Event()
        self.release = threading.Event()

    def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:
        self.records[request.key] = self.records.get(request.key, 0) + 1
        if self.mode == "unavailable":
            raise rpcframe.Unavailable("recorded, then lost")
        if self.mode == "hang":
            self.inside.set()
            self.release.wait(5)
        return bench_pb2.RecordResponse(times=self.records[request.key])


@pytest.fixture
def recorders() -> Iterator[list[Backend]]:
    started = [Backend(Recorder()) for _ in range(2)]
    yield started
    for backend in started:
        backend.servicer.release.set()
        backend.stop()


def _records(backends: list[Backend], key: str) -> int:
    return sum(b.servicer.records.get(key, 0) for b in backends)


def test_non_idempotent_method_runs_once_when_it_fails_after_send(recorders: list[Backend]) -> None:
    for backend in recorders:
        backend.servicer.mode = "unavailable"
    with _connect(recorders) as channel:
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        for i in range(10):
            with pytest.raises(rpcframe.Unavailable):
                stub.Record(bench_pb2.RecordRequest(key=f"k{i}"))
        assert [_records(recorders, f"k{i}") for i in range(10)] == [1] * 10
        assert channel.stats.retries == 0


def _stop_when_inside(backend: Backend) -> threading.Thread:
    """Stop ``backend``'s server once a Record call is inside its handler."""

    def stop() -> None:
        wait_until(backend.servicer.inside.is_set, 10)
        backend.server.stop(0)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


def test_non_idempotent_method_runs_once_when_its_server_dies_mid_call(recorders: list[Backend]) -> None:
    for backend in recorders:
        backend.servicer.mode = "hang"
    with _connect(recorders, policy="pick_first") as channel:
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        # Through a future: the first backend dies while the call is inside it.
        stopping = _stop_when_inside(recorders[0])
        with pytest.raises(rpcframe.RpcError) as info:
            stub.Record.future(bench_pb2.RecordRequest(key="pay")).result(timeout=10)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert _records(recorders, "pay") == 1
        stopping.join(10)
        # Through the blocking path too, on the second backend.
        wait_until(lambda: dict(channel.endpoints()).get(recorders[0].address) != "READY")
        stopping = _stop_when_inside(recorders[1])
        with pytest.raises(rpcframe.RpcError):
            stub.Record(bench_pb2.RecordRequest(key="pay-2"))
        stopping.join(10)
        assert _records(recorders, "pay-2") == 1


class Relay(ScriptedEcho):
    """Forwards every Echo downstream and counts what it saw."""

    def __init__(self, downstream: str) -> None:
        super().__init__("relay")
        self.channel = rpcframe.connect(downstream, _config())

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        return self.channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(request)  # type: ignore[no-any-return]


def test_a_retried_request_is_not_retried_again_downstream() -> None:
    last = Backend(ScriptedEcho("c"))
    last.servicer.failing = True
    relay = Backend(Relay(last.address))
    try:
        with rpcframe.connect(relay.address, _config(retry=rpcframe.RetryPolicy(max_attempts=1))) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            with pytest.raises(rpcframe.Unavailable):
                stub.Echo(pb.EchoRequest(message="x"))
            assert last.servicer.calls == 3  # the relay retried (3 attempts)
            with pytest.raises(rpcframe.Unavailable):
                stub.Echo(pb.EchoRequest(message="x"), metadata=(("rpcframe-attempt", "2"),))
            assert last.servicer.calls == 4  # marked as a retry: no retry
    finally:
        relay.stop()
        relay.servicer.channel.close()
        last.stop()


class PushingBack(ScriptedEcho):
    """Fails the first call with UNAVAILABLE and a retry pushback."""

    def __init__(self, pushback: str) -> None:
        super().__init__("p")
        self.pushback = pushback

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        self.calls += 1
        if self.calls == 1:
            raise rpcframe.Unavailable("busy", trailing_metadata=(("grpc-retry-pushback-ms", self.pushback),))
        return pb.EchoResponse(message="ok")


def test_server_pushback_sets_the_retry_delay() -> None:
    backend = Backend(PushingBack("300"))
    try:
        with _connect([backend]) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            start = time.monotonic()
            assert stub.Echo(pb.EchoRequest(message="x")).message == "ok"
            assert time.monotonic() - start >= 0.3
            assert backend.servicer.calls == 2
    finally:
        backend.stop()


def test_negative_pushback_stops_retries() -> None:
    backend = Backend(PushingBack("-1"))
    try:
        with _connect([backend]) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            with pytest.raises(rpcframe.Unavailable):
                stub.Echo(pb.EchoRequest(message="x"))
            assert backend.servicer.calls == 1
    finally:
        backend.stop()


# -- hedging -----------------------------------------------------------------------


class FirstStalls(ScriptedEcho):
    """The first call to any of the servers sharing ``state`` stalls until cancelled."""

    def __init__(self, name: str, state: dict[str, Any]) -> None:
        super().__init__(name)
        self.state = state

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        with self.state["lock"]:
            first = not self.state["taken"]
            self.state["taken"] = True
        if first:
            context.add_callback(self.state["cancelled"].set)
            self.state["cancelled"].wait(5)
            return pb.EchoResponse(message="slow")
        return pb.EchoResponse(message=self.name)


HEDGED = {ECHO: rpcframe.MethodConfig(hedge=rpcframe.HedgePolicy(delay=0.05, max_extra_load=1.0))}


@pytest.fixture
def stalling() -> Iterator[tuple[list[Backend], dict[str, Any]]]:
    state: dict[str, Any] = {"lock": threading.Lock(), "taken": False, "cancelled": threading.Event()}
    started = [Backend(FirstStalls(name, state)) for name in "ab"]
    yield started, state
    state["cancelled"].set()
    for backend in started:
        backend.stop()


def test_hedged_call_answers_from_the_backup_and_cancels_the_loser(
    stalling: tuple[list[Backend], dict[str, Any]],
) -> None:
    backends, state = stalling
    with _connect(backends, methods=HEDGED) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(pb.EchoRequest(message="x")).message in ("a", "b")
        wait_until(state["cancelled"].is_set)
        assert (channel.stats.hedges, channel.stats.hedge_wins) == (1, 1)


async def test_aio_hedged_call_answers_from_the_backup_and_cancels_the_loser(
    stalling: tuple[list[Backend], dict[str, Any]],
) -> None:
    backends, state = stalling
    config = _config(methods=HEDGED)
    async with rpcframe.aio.connect([b.address for b in backends], config) as channel:
        async with asyncio.timeout(5):
            while sum(s == "READY" for _, s in channel.endpoints()) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert (await stub.Echo(pb.EchoRequest(message="x"))).message in ("a", "b")
        async with asyncio.timeout(5):
            while not state["cancelled"].is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        assert (channel.stats.hedges, channel.stats.hedge_wins) == (1, 1)


def test_non_idempotent_method_is_never_hedged(recorders: list[Backend]) -> None:
    methods = {"rpcframe.bench.v1.BenchService": rpcframe.MethodConfig(hedge=rpcframe.HedgePolicy(delay=0.0))}
    with _connect(recorders, methods=methods) as channel:
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        for i in range(5):
            stub.Record(bench_pb2.RecordRequest(key=f"h{i}"))
        assert [_records(recorders, f"h{i}") for i in range(5)] == [1] * 5
        assert channel.stats.hedges == 0


async def test_aio_idempotent_call_is_retried_on_another_endpoint(echoes: list[Backend]) -> None:
    echoes[1].servicer.failing = True
    async with rpcframe.aio.connect([b.address for b in echoes], _config()) as channel:
        async with asyncio.timeout(5):
            while sum(s == "READY" for _, s in channel.endpoints()) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        answers = [(await stub.Echo(pb.EchoRequest(message="whoami"))).message for _ in range(30)]
        assert "b" not in answers
        assert channel.stats.retries == echoes[1].servicer.calls > 0


# -- streams -----------------------------------------------------------------------


class FlakyExpand(ScriptedEcho):
    """Expand fails with UNAVAILABLE before its first response (``failing``) or after it (``midway``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.midway = False
        self.streams = 0

    def Expand(self, request: pb.ExpandRequest, context: Any) -> Iterator[pb.EchoResponse]:
        self.streams += 1
        if self.failing:
            raise rpcframe.Unavailable(f"{self.name} is failing")
        yield pb.EchoResponse(message=self.name, index=0)
        if self.midway:
            raise rpcframe.Unavailable(f"{self.name} broke midway")
        for i in range(1, request.count):
            yield pb.EchoResponse(message=self.name, index=i)


@pytest.fixture
def flaky() -> Iterator[list[Backend]]:
    started = [Backend(FlakyExpand(name)) for name in "ab"]
    started[0].servicer.failing = True
    yield started
    for backend in started:
        backend.stop()


def _streams(backends: list[Backend]) -> list[int]:
    return [b.servicer.streams for b in backends]


def test_server_stream_is_retried_before_its_first_response(flaky: list[Backend]) -> None:
    with _connect(flaky) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(6):
            assert [r.message for r in stub.Expand(pb.ExpandRequest(count=3))] == ["b"] * 3
        assert channel.stats.retries == _streams(flaky)[0] > 0


def test_server_stream_is_not_retried_after_a_response(flaky: list[Backend]) -> None:
    flaky[0].servicer.failing = False
    for backend in flaky:
        backend.servicer.midway = True
    with _connect(flaky) as channel:
        stream = channel.stub(echo_pb2_grpc.EchoServiceStub).Expand(pb.ExpandRequest(count=3))
        assert next(stream).index == 0
        with pytest.raises(rpcframe.Unavailable, match="broke midway"):
            next(stream)
        assert sum(_streams(flaky)) == 1


async def test_aio_server_stream_is_retried_before_its_first_response(flaky: list[Backend]) -> None:
    async with rpcframe.aio.connect([b.address for b in flaky], _config()) as channel:
        async with asyncio.timeout(5):
            while sum(s == "READY" for _, s in channel.endpoints()) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(6):
            assert [r.message async for r in stub.Expand(pb.ExpandRequest(count=3))] == ["b"] * 3
        assert channel.stats.retries == _streams(flaky)[0] > 0


class AttemptRecorder(ScriptedEcho):
    """Records the ``rpcframe-attempt`` marker of every call it gets."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.markers: list[str | None] = []

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        marks = [v for k, v in context.invocation_metadata() if k == "rpcframe-attempt"]
        self.markers.append(marks[0] if marks else None)
        return super().Echo(request, context)


def test_retries_carry_their_attempt_number() -> None:
    backends = [Backend(AttemptRecorder(name)) for name in "ab"]
    backends[0].servicer.failing = True
    try:
        with _connect(backends, policy="pick_first") as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            assert stub.Echo(pb.EchoRequest(message="whoami")).message == "b"
        assert backends[0].servicer.markers == [None]
        assert backends[1].servicer.markers == ["2"]
    finally:
        for backend in backends:
            backend.stop()
