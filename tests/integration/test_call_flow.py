"""The one call flow, seen from outside: call objects on both fronts, deadlines, and the observer seam."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.observe import AttemptInfo, CallInfo, CallObserver
from tests.conftest import Running, wait_until
from tests.servicers import AioScriptedEcho, Backend, ScriptedEcho

ECHO = "rpcframe.echo.v1.EchoService/Echo"
_HEDGED = {ECHO: rpcframe.MethodConfig(hedge=rpcframe.HedgePolicy(delay=0.05))}


class Recorder(CallObserver):
    """Keeps every event as a tuple."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def call_started(self, call: CallInfo) -> None:
        self.events.append(("call", call.method, call.kind))

    def attempt_started(self, call: CallInfo, attempt: AttemptInfo) -> None:
        self.events.append(("attempt", attempt.number, attempt.reason, attempt.endpoint))

    def attempt_ended(self, call: CallInfo, attempt: AttemptInfo, status: grpc.StatusCode, latency: float) -> None:
        assert latency >= 0
        self.events.append(("attempt_end", attempt.number, status.name))

    def call_ended(self, call: CallInfo, status: grpc.StatusCode, attempts: int, latency: float) -> None:
        assert latency >= 0
        self.events.append(("call_end", status.name, attempts))


def _connect(backends: list[Backend], **kwargs: Any) -> rpcframe.Channel:
    config = rpcframe.ChannelConfig(policy="round_robin", slow_start=0, default_timeout=10, **kwargs)
    channel = rpcframe.connect([b.address for b in backends], config)
    wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
    return channel


# -- the observer seam ----------------------------------------------------------------


def test_observer_sees_a_retried_call_attempt_by_attempt(two: list[Backend]) -> None:
    two[0].servicer.failing = True
    recorder = Recorder()
    with _connect(two, observers=(recorder,)) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(4):  # round robin: at least one call meets the failing backend first
            stub.Echo(pb.EchoRequest(message="whoami"))
    retried = [i for i, e in enumerate(recorder.events) if e[:3] == ("attempt", 2, "retry")]
    assert retried, recorder.events
    i = retried[0]
    assert recorder.events[i - 2][:1] == ("attempt",)
    assert recorder.events[i - 1] == ("attempt_end", 1, "UNAVAILABLE")
    assert recorder.events[i + 1] == ("attempt_end", 2, "OK")
    assert recorder.events[i + 2] == ("call_end", "OK", 2)
    assert recorder.events.count(("call", f"/{ECHO}", "unary_unary")) == 4


def test_observers_compose_and_see_streams_and_failures(sync_server: Running) -> None:
    first, second = Recorder(), Recorder()
    config = rpcframe.ChannelConfig(observers=(first, second))
    with rpcframe.connect(sync_server.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert [r.index for r in stub.Expand(pb.ExpandRequest(message="m", count=3))] == [0, 1, 2]
        with pytest.raises(rpcframe.NotFound):
            stub.Echo(pb.EchoRequest(message="raise:NotFound:gone"))
    assert first.events == second.events
    assert ("call", "/rpcframe.echo.v1.EchoService/Expand", "unary_stream") in first.events
    assert first.events[-2:] == [("attempt_end", 1, "NOT_FOUND"), ("call_end", "NOT_FOUND", 1)]


def test_an_observer_may_refuse_a_call_before_it_is_sent(sync_server: Running) -> None:
    class Throttle(CallObserver):
        def call_started(self, call: CallInfo) -> None:
            raise rpcframe.ResourceExhausted("throttled by the client")

    calls_before = sync_server.servicer.calls
    with rpcframe.connect(sync_server.target, rpcframe.ChannelConfig(observers=(Throttle(),))) as channel:
        with pytest.raises(rpcframe.ResourceExhausted, match="throttled"):
            channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="x"))
    assert sync_server.servicer.calls == calls_before


async def test_aio_observer_sees_hedges(aio_server: Running) -> None:
    recorder = Recorder()
    config = rpcframe.ChannelConfig(observers=(recorder,), methods=_HEDGED)
    async with rpcframe.aio.connect(aio_server.target, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(30):  # teach the method its latency (a few ms)
            await stub.Echo(pb.EchoRequest(message="x"))
        await stub.Echo(pb.EchoRequest(message="sleep:0.3"))  # slower than its p95: a hedge is sent
    assert any(e[:3] == ("attempt", 2, "hedge") for e in recorder.events), recorder.events[-6:]
    assert recorder.events[-1][:2] == ("call_end", "OK")


# -- call objects (defects the interop suite found) ----------------------------------------


async def test_aio_hedged_call_answers_status_and_metadata(aio_server: Running) -> None:
    config = rpcframe.ChannelConfig(methods=_HEDGED)
    async with rpcframe.aio.connect(aio_server.target, config) as channel:
        call = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="hi"))
        assert (await call).message == "hi"
        assert await call.code() is grpc.StatusCode.OK
        assert await call.details() == ""
        assert await call.initial_metadata() is not None
        assert await call.trailing_metadata() is not None
        assert call.done()
        assert not call.cancelled()
        failing = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="raise:NotFound:gone"))
        assert await failing.code() is grpc.StatusCode.NOT_FOUND
        assert await failing.details() == "gone"


async def test_aio_call_waiting_for_an_endpoint_answers_its_status(aio_server: Running) -> None:
    resolver = rpcframe.ManualResolver()  # no endpoint yet: calls wait for one (wait_for_ready)
    async with rpcframe.aio.connect(resolver) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        late = stub.Echo(pb.EchoRequest(message="x"), wait_for_ready=True, timeout=0.2)
        assert not late.done()
        assert await late.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "waiting for an endpoint" in await late.details()
        assert late.done()
        with pytest.raises(rpcframe.DeadlineExceeded):
            await late
        waiting = stub.Echo(pb.EchoRequest(message="found"), wait_for_ready=True, timeout=5)
        assert not waiting.done()
        assert not waiting.cancelled()
        resolver.update([aio_server.target])
        assert (await waiting).message == "found"
        assert await waiting.code() is grpc.StatusCode.OK


async def test_aio_cancel_raises_rpcframe_cancelled_on_read_and_await(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        stream = stub.Expand(pb.ExpandRequest(message="m", count=100_000))
        assert (await stream.read()).index == 0
        assert stream.cancel()
        with pytest.raises(rpcframe.Cancelled):
            await stream.read()
        unary = stub.Echo(pb.EchoRequest(message="block"))
        await asyncio.wait_for(aio_server.servicer.started.wait(), 5)
        assert unary.cancel()
        with pytest.raises(rpcframe.Cancelled):
            await unary
        assert await unary.code() is grpc.StatusCode.CANCELLED


async def test_aio_deadline_starts_when_the_method_is_called(aio_server: Running) -> None:
    """Before: the deadline was fixed when the call was awaited, so retries ran past the caller's timeout."""
    async with rpcframe.aio.connect(aio_server.target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        before = aio_server.servicer.calls
        started = time.monotonic()
        call = stub.Echo(pb.EchoRequest(message="raise:Unavailable:down"), timeout=0.2)
        await asyncio.sleep(0.3)  # the caller awaits late; its timeout has passed meanwhile
        with pytest.raises(rpcframe.Unavailable):
            await call
        assert time.monotonic() - started < 1.0
        assert aio_server.servicer.calls - before == 1  # no retry after the caller's deadline


def test_sync_future_answers_status_and_metadata(sync_server: Running) -> None:
    with rpcframe.connect(sync_server.target) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        ok = stub.Echo.future(pb.EchoRequest(message="hi"))
        assert ok.result(5).message == "hi"
        assert ok.code() is grpc.StatusCode.OK
        assert ok.details() == ""
        assert ok.initial_metadata() is not None
        assert ok.trailing_metadata() is not None
        failing = stub.Echo.future(pb.EchoRequest(message="raise:NotFound:gone"))
        assert isinstance(failing.exception(5), rpcframe.NotFound)
        assert failing.code() is grpc.StatusCode.NOT_FOUND
        assert failing.details() == "gone"
        assert ("x-error-ref", "42") in tuple(failing.trailing_metadata())


def test_sync_future_is_retried_like_a_call(two: list[Backend]) -> None:
    two[0].servicer.failing = True
    with _connect(two) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        answers = [stub.Echo.future(pb.EchoRequest(message="whoami")).result(5).message for _ in range(6)]
        assert set(answers) == {"b"}
        assert channel.stats.retries >= 1



# -- the server side of the seam ----------------------------------------------------------


class ServerRecorder(CallObserver):
    """Keeps (method, status) of every finished incoming call; refuses calls whose metadata asks it to."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []

    def call_received(self, call: Any) -> None:
        assert call.identity.method == "none"  # no auth configured: the anonymous caller, read when asked
        if ("x-refuse", "1") in tuple(call.context.invocation_metadata()):
            raise rpcframe.ResourceExhausted("over the limit")

    def call_finished(self, call: Any, status: grpc.StatusCode, latency: float) -> None:
        assert latency >= 0
        self.finished.append((call.method.rsplit("/", 1)[1], status.name))


_SERVER_CASES = [
    ("x", "OK"),
    ("raise:NotFound:gone", "NOT_FOUND"),
    ("py:ValueError:bad", "INVALID_ARGUMENT"),
    ("abort:PERMISSION_DENIED:no", "PERMISSION_DENIED"),
    ("py:RuntimeError:boom", "INTERNAL"),
]


def _expected() -> list[tuple[str, str]]:
    return [("Echo", status) for _, status in _SERVER_CASES] + [("Expand", "OK")]


def test_sync_server_observer_sees_every_call_and_may_refuse() -> None:
    recorder = ServerRecorder()
    backend_servicer = ScriptedEcho("s")
    server = rpcframe.Server(rpcframe.ServerConfig(observers=(recorder,)))
    server.add(backend_servicer)
    port = server.bind("127.0.0.1:0")
    server.start()
    try:
        with rpcframe.connect(f"127.0.0.1:{port}") as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for message, _ in _SERVER_CASES:
                try:
                    stub.Echo(pb.EchoRequest(message=message))
                except rpcframe.RpcError:
                    pass
            assert len(list(stub.Expand(pb.ExpandRequest(message="m", count=2)))) == 2
            calls = backend_servicer.calls
            with pytest.raises(rpcframe.ResourceExhausted, match="over the limit"):
                stub.Echo(pb.EchoRequest(message="x"), metadata=(("x-refuse", "1"),))
            assert backend_servicer.calls == calls  # refused before the handler ran
    finally:
        server.stop(0)
    assert recorder.finished == _expected()


async def test_aio_server_observer_sees_every_call_and_may_refuse() -> None:
    recorder = ServerRecorder()
    servicer = AioScriptedEcho("s")
    server = rpcframe.aio.Server(rpcframe.ServerConfig(observers=(recorder,)))
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    await server.start()
    try:
        async with rpcframe.aio.connect(f"127.0.0.1:{port}") as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for message, _ in _SERVER_CASES:
                try:
                    await stub.Echo(pb.EchoRequest(message=message))
                except rpcframe.RpcError:
                    pass
            assert len([r async for r in stub.Expand(pb.ExpandRequest(message="m", count=2))]) == 2
            calls = servicer.calls
            with pytest.raises(rpcframe.ResourceExhausted, match="over the limit"):
                await stub.Echo(pb.EchoRequest(message="x"), metadata=(("x-refuse", "1"),))
            assert servicer.calls == calls
    finally:
        await server.stop(0)
    assert recorder.finished == _expected()


def test_observers_add_headers_and_see_message_sizes() -> None:
    """What tracing needs: a header on every attempt (trace context) and the sizes of what was sent."""

    class Tracer(CallObserver):
        def __init__(self) -> None:
            self.sizes: list[tuple[int | None, int | None]] = []

        def call_started(self, call: CallInfo) -> None:
            call.add_metadata("x-trace", "t-1")

        def attempt_ended(self, call: CallInfo, attempt: AttemptInfo, status: grpc.StatusCode, latency: float) -> None:
            self.sizes.append((call.sent_bytes, attempt.received_bytes))

    class Seen(CallObserver):
        def __init__(self) -> None:
            self.traces: list[str | None] = []

        def call_received(self, call: Any) -> None:
            self.traces.append(dict(call.context.invocation_metadata()).get("x-trace"))

    tracer, seen = Tracer(), Seen()
    server = rpcframe.Server(rpcframe.ServerConfig(observers=(seen,)))
    server.add(ScriptedEcho("s"))
    port = server.bind("127.0.0.1:0")
    server.start()
    try:
        with rpcframe.connect(f"127.0.0.1:{port}", rpcframe.ChannelConfig(observers=(tracer,))) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            request = pb.EchoRequest(message="hello")
            assert stub.Echo(request, metadata=(("x-other", "1"),)).message == "hello"
    finally:
        server.stop(0)
    assert seen.traces == ["t-1"]
    assert tracer.sizes == [(request.ByteSize(), pb.EchoResponse(message="hello").ByteSize())]
