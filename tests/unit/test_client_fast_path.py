"""The unary fast path (no observer, no hedging): first attempt without a flow, the flow only when it does not answer.

Real servers on 127.0.0.1. Each test checks what the flow did before the
fast path existed: the pick is released (no call left in flight on the
endpoint), latencies are recorded, failures are retried or failed over,
and cancellation ends the call the way it ended the flow.
"""

from __future__ import annotations

import asyncio
import gc

import grpc
import pytest

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.client._common import ATTEMPT_KEY, CallPlan
from tests.conftest import Running, eventually, wait_until
from tests.servicers import Backend

_CONFIG = rpcframe.ChannelConfig(policy="round_robin", slow_start=0, default_timeout=10)


def _inflight(channel: rpcframe.Channel | rpcframe.aio.Channel) -> int:
    return sum(state.in_flight for state in channel.endpoint_states())


async def test_aio_answer_is_recorded_and_the_pick_released(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert (await stub.Echo(pb.EchoRequest(message="one"))).message == "one"
        stats = channel.balancer.entries()[0].stats
        assert stats.latency > 0  # the answer was reported to the endpoint
        assert _inflight(channel) == 0
        assert channel.counters()["retries"] == 0


async def test_aio_status_before_await_then_the_response(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        call = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="x"))
        assert await call.code() is grpc.StatusCode.OK
        assert await call.details() == ""
        assert (await call).message == "x"
        assert _inflight(channel) == 0


async def test_aio_call_dropped_unawaited_releases_its_pick(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        await stub.Echo(pb.EchoRequest(message="warm"))
        call = stub.Echo(pb.EchoRequest(message="block"))
        assert _inflight(channel) == 1
        del call
        gc.collect()
        assert _inflight(channel) == 0


async def test_aio_cancel_before_await_is_rpcframe_cancelled(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        call = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="block"))
        assert call.cancel()
        with pytest.raises(rpcframe.Cancelled):
            await call
        assert call.cancelled()
        assert await call.code() is grpc.StatusCode.CANCELLED
        assert _inflight(channel) == 0


async def test_aio_task_cancelled_while_awaiting(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        task = asyncio.ensure_future(channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="block")))
        await asyncio.wait_for(aio_server.servicer.started.wait(), 5)  # type: ignore[attr-defined]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _inflight(channel) == 0
        await asyncio.wait_for(aio_server.servicer.cancelled.wait(), 5)  # type: ignore[attr-defined]


async def test_aio_application_error_is_not_retried(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        with pytest.raises(rpcframe.NotFound) as info:
            await channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="raise:NotFound:gone"))
        assert info.value.details() == "gone"
        assert channel.counters()["retries"] == 0
        assert _inflight(channel) == 0


async def test_aio_call_under_a_deadline_block(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        with rpcframe.deadline_after(5) as scope:
            call = stub.Echo(pb.EchoRequest(message="deadline"))
            assert len(scope.root.calls or ()) == 1  # the attempt in flight can be cancelled with the scope
            remaining = float((await call).message)
        assert 0 < remaining <= 5
        assert not scope.root.calls  # the attempt was untracked once awaited
        assert _inflight(channel) == 0


async def test_aio_failed_first_attempt_fails_over(two: list[Backend]) -> None:
    two[0].servicer.failing = True
    async with rpcframe.aio.connect([b.address for b in two], _CONFIG) as channel:
        await eventually(_all_ready(channel))
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        answers = {(await stub.Echo(pb.EchoRequest(message="whoami"))).message for _ in range(6)}
        assert answers == {"b"}
        assert channel.counters()["retries"] >= 1  # a first attempt failed and the flow took over
        assert _inflight(channel) == 0


def _all_ready(channel: rpcframe.aio.Channel):  # type: ignore[no-untyped-def]
    async def ready() -> bool:
        return all(state == "READY" for _, state in channel.endpoints())

    return ready


def test_sync_answer_and_with_call(sync_server: Running) -> None:
    with rpcframe.connect(sync_server.target, _CONFIG) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(pb.EchoRequest(message="one")).message == "one"
        response, call = stub.Echo.with_call(pb.EchoRequest(message="two"))
        assert response.message == "two"
        assert call.code() is grpc.StatusCode.OK
        assert channel.balancer.entries()[0].stats.latency > 0
        assert _inflight(channel) == 0


def test_sync_failed_first_attempt_fails_over(two: list[Backend]) -> None:
    two[0].servicer.failing = True
    with rpcframe.connect([b.address for b in two], _CONFIG) as channel:
        wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert {stub.Echo(pb.EchoRequest(message="whoami")).message for _ in range(6)} == {"b"}
        assert channel.counters()["retries"] >= 1
        assert _inflight(channel) == 0


def test_sync_application_error_is_not_retried(sync_server: Running) -> None:
    with rpcframe.connect(sync_server.target, _CONFIG) as channel:
        with pytest.raises(rpcframe.NotFound):
            channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="raise:NotFound:gone"))
        assert channel.counters()["retries"] == 0
        assert _inflight(channel) == 0


def test_the_plan_is_a_whole_call_plan(sync_server: Running) -> None:
    with rpcframe.connect(sync_server.target, _CONFIG) as channel:
        method = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo
        request = pb.EchoRequest(message="p")
        plan = method._prepare(request, 3.0, (("k", "v"),), None, True, None)
        assert type(plan) is CallPlan
        assert plan.timeout == 3.0
        assert plan.wait_for_ready is True
        assert plan.request is request
        assert plan.metadata == plan.base_metadata == (("k", "v"),)
        assert plan.attempt == 1
        assert plan.scope is None
        assert plan.deadline is not None
        assert plan.next(2).metadata == (("k", "v"), (ATTEMPT_KEY, "2"))


async def test_aio_two_awaiters_of_one_call_get_its_response_and_release_the_pick_once(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        call = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="twice"))
        first, second = await asyncio.gather(asyncio.ensure_future(call), asyncio.ensure_future(call))
        assert first.message == second.message == "twice"
        assert _inflight(channel) == 0  # not -1: the answer was reported once


async def test_aio_two_awaiters_of_a_failing_call_get_its_error(aio_server: Running) -> None:
    async with rpcframe.aio.connect(aio_server.target, _CONFIG) as channel:
        call = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="raise:NotFound:gone"))
        results = await asyncio.gather(asyncio.ensure_future(call), asyncio.ensure_future(call), return_exceptions=True)
        assert all(isinstance(r, rpcframe.NotFound) for r in results)
        assert _inflight(channel) == 0
