"""Overload protection and rate limits on real servers, both fronts.

A limit held at one call (``OverloadConfig(initial_limit=1, max_limit=1)``)
makes refusals deterministic: while a "block" call holds the slot, the next
call is refused before its handler runs, marked never-run, with a pushback.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import rpcframe
import rpcframe.aio
from examples.echo import EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.prometheus import PrometheusObserver
from rpcframe.security import ApiKeys, AuthConfig, StaticToken
from tests.cli import ServeProcess
from tests.conftest import wait_until
from tests.h2raw import grpc_frame, open_connection, read_answer, send_request
from tests.servicers import AioScriptedEcho, ScriptedEcho

ONE_AT_A_TIME = rpcframe.OverloadConfig(initial_limit=1, max_limit=1, queue_target=10.0)
ECHO = "rpcframe.echo.v1.EchoService/Echo"


def _sync_server(servicer: object, **config: Any) -> tuple[rpcframe.Server, str]:
    server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1, **config))
    server.add(servicer)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    server.start()
    return server, address


async def _aio_server(servicer: object, **config: Any) -> tuple[rpcframe.aio.Server, str]:
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=1, **config))
    server.add(servicer)
    address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
    await server.start()
    return server, address


def test_a_refused_call_is_not_run_and_another_endpoint_takes_it() -> None:
    registry = CollectorRegistry()
    first, second = ScriptedEcho("a"), ScriptedEcho("b")
    busy, busy_address = _sync_server(first, overload=ONE_AT_A_TIME, observers=(PrometheusObserver(registry),))
    spare, spare_address = _sync_server(second, overload=ONE_AT_A_TIME)
    config = rpcframe.ChannelConfig(policy="pick_first", default_timeout=10)
    try:
        with rpcframe.connect([busy_address, spare_address], config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            wait_until(lambda: all(state == "READY" for _, state in channel.endpoints()))
            blocked = stub.Echo.future(pb.EchoRequest(message="block"))
            assert first.started.wait(10)
            assert stub.Echo(pb.EchoRequest(message="whoami")).message == "b"  # refused by a, run by b
            first.release.set()
            assert blocked.result().message == "block"
            assert channel.counters()["failovers"] == 1
    finally:
        busy.stop(0)
        spare.stop(0)
    assert first.calls == 1  # only the blocking call ran there
    assert second.calls == 1
    assert busy.shed() == {"concurrency": 1}
    assert 'rpcframe_server_shed_total{rpcframe_reason="concurrency"} 1.0' in generate_latest(registry).decode()


def test_the_only_endpoint_is_retried_after_its_pushback() -> None:
    servicer = ScriptedEcho("a")
    server, address = _sync_server(servicer, overload=ONE_AT_A_TIME)
    retry = rpcframe.RetryPolicy(max_attempts=5)
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(default_timeout=10, retry=retry)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(64):  # the method's median latency, which the pushback is based on
                stub.Echo(pb.EchoRequest(message="sleep:0.01"))
            blocked = stub.Echo.future(pb.EchoRequest(message="block"))
            assert servicer.started.wait(10)

            def release_after_a_refusal() -> None:
                wait_until(lambda: server.shed().get("concurrency", 0) >= 1)
                servicer.release.set()

            releaser = threading.Thread(target=release_after_a_refusal)
            releaser.start()
            start = time.monotonic()
            assert stub.Echo(pb.EchoRequest(message="whoami")).message == "a"
            elapsed = time.monotonic() - start
            releaser.join(10)
            blocked.result()
            retried = channel.counters()["retries"]
    finally:
        server.stop(0)
    refused = server.shed()["concurrency"]
    assert refused >= 1
    assert retried == refused  # each refusal was retried once, after its pushback
    assert elapsed >= 0.009 * refused  # waited the ~10 ms pushback before each retry
    assert servicer.calls == 64 + 2  # the refused attempts never ran


def test_a_call_that_cannot_meet_its_deadline_is_refused_unrun() -> None:
    servicer = ScriptedEcho("a")
    server, address = _sync_server(servicer)  # default protection
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(default_timeout=10)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(64):
                stub.Echo(pb.EchoRequest(message="sleep:0.02"))
            with pytest.raises(rpcframe.DeadlineExceeded):
                stub.Echo(pb.EchoRequest(message="sleep:0.02"), timeout=0.005)
    finally:
        server.stop(0)
    assert server.shed().get("deadline", 0) >= 1
    assert servicer.calls == 64  # refused before the handler, however many attempts


def test_rate_limits_apply_per_caller() -> None:
    keys = {"alice": "k-alice-0123456789", "bob": "k-bob-0123456789ab"}
    auth = AuthConfig(api_keys=ApiKeys.from_plain(keys))
    limit = rpcframe.RateLimit(rate=0.5, burst=2, method=ECHO, per_caller=True)
    servicer = ScriptedEcho("a")
    server, address = _sync_server(servicer, auth=auth, rate_limits=(limit,))
    no_retry = rpcframe.RetryPolicy(max_attempts=1)

    def calls(caller: str, count: int) -> list[str]:
        token = StaticToken(keys[caller], scheme=None, key_name="x-api-key")
        config = rpcframe.ChannelConfig(default_timeout=10, token=token, retry=no_retry)
        answers = []
        with rpcframe.connect(address, config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(count):
                try:
                    answers.append(stub.Echo(pb.EchoRequest(message="whoami")).message)
                except rpcframe.ResourceExhausted as exc:
                    answers.append(exc.details())
        return answers

    try:
        alice, bob = calls("alice", 3), calls("bob", 2)
    finally:
        server.stop(0)
    assert alice[:2] == ["a", "a"]
    assert alice[2].startswith("rate limit exceeded: not run; retry after ")
    assert bob == ["a", "a"]  # another caller's bucket
    assert servicer.calls == 4
    assert server.shed() == {"rate_limit": 1}


class _Criticality(EchoServicer):
    """Answers with the criticality the call carried; "relay:ADDRESS" asks ADDRESS instead."""

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        if request.message.startswith("relay:"):
            with rpcframe.connect(request.message[6:], rpcframe.ChannelConfig(default_timeout=5)) as channel:
                return channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="who"))
        found = [v for k, v in context.invocation_metadata() if k == "rpcframe-criticality"]
        return pb.EchoResponse(message=",".join(found) or "none")


def test_criticality_is_sent_and_inherited_across_a_hop() -> None:
    leaf, leaf_address = _sync_server(_Criticality())
    relay, relay_address = _sync_server(_Criticality())
    methods = {ECHO: rpcframe.MethodConfig(criticality="sheddable_plus")}
    try:
        with rpcframe.connect(relay_address, rpcframe.ChannelConfig(default_timeout=5)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            assert stub.Echo(pb.EchoRequest(message="who")).message == "none"
            with rpcframe.criticality("SHEDDABLE"):
                assert stub.Echo(pb.EchoRequest(message="who")).message == "SHEDDABLE"
                assert stub.Echo(pb.EchoRequest(message=f"relay:{leaf_address}")).message == "SHEDDABLE"
        with rpcframe.connect(relay_address, rpcframe.ChannelConfig(default_timeout=5, methods=methods)) as channel:
            assert channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="who")).message == (
                "SHEDDABLE_PLUS"
            )
    finally:
        leaf.stop(0)
        relay.stop(0)
    with pytest.raises(rpcframe.ConfigError, match="criticality must be one of"):
        rpcframe.MethodConfig(criticality="urgent")


async def test_aio_sheds_the_least_critical_first() -> None:
    servicer = AioScriptedEcho("a")
    server, address = await _aio_server(servicer, overload=ONE_AT_A_TIME)
    no_retry = rpcframe.RetryPolicy(max_attempts=1)
    try:
        async with rpcframe.aio.connect(address, rpcframe.ChannelConfig(default_timeout=10, retry=no_retry)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            blocked = asyncio.ensure_future(stub.Echo(pb.EchoRequest(message="block")))
            await asyncio.wait_for(servicer.started.wait(), 10)
            with rpcframe.criticality("SHEDDABLE"), pytest.raises(rpcframe.ResourceExhausted):
                await stub.Echo(pb.EchoRequest(message="whoami"))
            with rpcframe.criticality("CRITICAL_PLUS"):  # twice the limit: still room
                assert (await stub.Echo(pb.EchoRequest(message="whoami"))).message == "a"
            servicer.release.set()
            assert (await blocked).message == "block"
    finally:
        await server.stop(0)
    assert server.shed() == {"concurrency": 1}
    assert servicer.calls == 2  # the sheddable call never ran


class _LoopHog(echo_pb2_grpc.EchoServiceServicer):  # type: ignore[misc]
    """A CPU-bound asyncio handler: 40 ms without yielding, so the event loop runs late."""

    calls = 0

    async def Echo(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.calls += 1
        end = time.perf_counter() + 0.04
        while time.perf_counter() < end:
            pass
        return pb.EchoResponse(message=request.message)


async def test_aio_refuses_calls_queued_behind_a_busy_loop_and_admits_again_once_it_is_idle() -> None:
    servicer = _LoopHog()
    # A probe of the loop's lag lands at a random moment of a 40 ms handler: late by
    # more than 4 ms nine times in ten, so the least of four readings mostly is too.
    server, address = await _aio_server(servicer, overload=rpcframe.OverloadConfig(queue_target=0.004))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            echo = channel.unary_unary(
                f"/{ECHO}", request_serializer=pb.EchoRequest.SerializeToString,
                response_deserializer=pb.EchoResponse.FromString,
            )  # fmt: skip
            burst = [echo(pb.EchoRequest(message="x"), timeout=30) for _ in range(40)]
            results = await asyncio.gather(*burst, return_exceptions=True)
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert refused, "every call of the burst ran: the loop's queue was not seen"
            for error in refused:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error.details().startswith("server overloaded (queue): not run")
            assert servicer.calls == len(results) - len(refused) > 0  # refused calls never ran
            assert server.shed() == {"queue": len(refused)}
            # Idle again, the loop's lag readings fall and calls are admitted (polled: the
            # readings follow the clock, and a loaded machine can delay a few of them).
            give_up = time.monotonic() + 5
            while True:
                answer = await echo(pb.EchoRequest(message="after"), timeout=30).code()
                if answer == grpc.StatusCode.OK:
                    break
                assert answer == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < give_up, "still refusing 5 s after the burst"
                await asyncio.sleep(0.01)
    finally:
        await server.stop(0)


def test_rpcframe_serve_rate_limit_flag() -> None:
    serve = ServeProcess("tests.servicers:tagged", "--bind", "127.0.0.1:0", "--rate-limit", f"{ECHO}=0.1/2")
    try:
        config = rpcframe.ChannelConfig(default_timeout=10, retry=rpcframe.RetryPolicy(max_attempts=1))
        with rpcframe.connect(serve.target, config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(2):
                stub.Echo(pb.EchoRequest(message="x"))
            with pytest.raises(rpcframe.ResourceExhausted, match="rate limit exceeded"):
                stub.Echo(pb.EchoRequest(message="x"))
    finally:
        serve.terminate()


def test_client_throttling_stops_sending_to_a_backend_that_sheds_everything() -> None:
    servicer = ScriptedEcho("a")
    server, address = _sync_server(servicer, overload=ONE_AT_A_TIME)
    config = rpcframe.ChannelConfig(default_timeout=10, retry=rpcframe.RetryPolicy(max_attempts=1))
    calls = 40
    try:
        with rpcframe.connect(address, config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            blocked = stub.Echo.future(pb.EchoRequest(message="block"))
            assert servicer.started.wait(10)
            for _ in range(calls):
                with pytest.raises(rpcframe.ResourceExhausted):
                    stub.Echo(pb.EchoRequest(message="whoami"))
            throttled = channel.counters()["throttled"]
            servicer.release.set()
            blocked.result()
    finally:
        server.stop(0)
    shed = server.shed()["concurrency"]
    assert shed + throttled == calls  # each call was refused once: by the server or, unsent, by the client
    assert throttled >= calls // 2  # once most calls were refused, most were no longer sent
    assert servicer.calls == 1


def test_a_hedge_the_server_sheds_does_not_fail_the_call() -> None:
    servicer = ScriptedEcho("a")
    server, address = _sync_server(servicer, overload=ONE_AT_A_TIME)
    hedged = {ECHO: rpcframe.MethodConfig(hedge=rpcframe.HedgePolicy(delay=0.02, max_extra_load=1.0))}
    try:
        with rpcframe.connect(address, rpcframe.ChannelConfig(default_timeout=10, methods=hedged)) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            stub.Echo(pb.EchoRequest(message="x"))  # earns the hedging budget a backup
            # The backup, 20 ms in, finds the only slot taken: refused unrun; the first copy answers.
            assert stub.Echo(pb.EchoRequest(message="sleep:0.2")).message == "sleep:0.2"
            hedges = channel.counters()["hedges"]
    finally:
        server.stop(0)
    assert hedges >= 1
    assert server.shed().get("concurrency", 0) >= 1
    assert servicer.calls == 2


class _LoopBlockingEcho(echo_pb2_grpc.EchoServiceServicer):
    """Echo whose "block" call holds the event loop (on purpose) until ``release`` is set."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.ran = 0

    async def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        self.ran += 1
        if request.message == "block":
            self.started.set()
            self.release.wait(10)  # a blocked loop takes no new call: they wait in grpc's queue
        return pb.EchoResponse(message=request.message)


async def test_aio_accept_queue_refuses_calls_grpc_holds_before_python_sees_them() -> None:
    servicer = _LoopBlockingEcho()
    server, address = await _aio_server(servicer, overload=rpcframe.OverloadConfig(accept_queue=2))
    codes: list[Any] = []
    lock = threading.Lock()

    def load(stub: Any) -> None:
        # Runs while the loop is held: 20 calls, all waiting in grpc's queue or refused by it.
        assert servicer.started.wait(10)

        def done(future: Any) -> None:
            with lock:
                codes.append(future.code())
                if codes.count(grpc.StatusCode.CANCELLED) >= 10:
                    servicer.release.set()

        futures = [stub.Echo.future(pb.EchoRequest(message=str(i)), timeout=20) for i in range(20)]
        for future in futures:
            future.add_done_callback(done)
        for future in futures:
            future.exception(timeout=20)

    try:
        with grpc.insecure_channel(address) as raw:  # a plain client off the loop, which the handler holds
            stub = echo_pb2_grpc.EchoServiceStub(raw)
            blocker = stub.Echo.future(pb.EchoRequest(message="block"), timeout=20)
            loader = threading.Thread(target=load, args=(stub,))
            loader.start()
            await asyncio.to_thread(loader.join, 30)
            assert blocker.result(timeout=10).message == "block"
            assert servicer.release.is_set(), f"grpc refused too few calls: {codes}"
            refused = codes.count(grpc.StatusCode.CANCELLED)
            assert refused >= 10, codes
            assert codes.count(grpc.StatusCode.OK) == 20 - refused, codes
            assert servicer.ran == 1 + 20 - refused  # the refused calls never reached the handler
            assert (await asyncio.to_thread(stub.Echo, pb.EchoRequest(message="after"), timeout=10)).message == "after"
    finally:
        servicer.release.set()
        await server.stop(0)


async def test_aio_refuses_before_reading_the_request() -> None:
    """A call the server refuses is answered from its headers: the request message is never awaited.

    The raw HTTP/2 client sends a call's headers and no message, keeping its
    side open; refused calls (no credentials; over the rate limit) are
    answered at once, and the server never parses what was not read.
    """
    keys = {"alice": "k-alice-0123456789"}
    auth = AuthConfig(api_keys=ApiKeys.from_plain(keys))
    limit = rpcframe.RateLimit(rate=1e-6, burst=1, method=ECHO)  # one call, then none
    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=0, auth=auth, rate_limits=(limit,)))
    servicer = AioScriptedEcho("a")
    server.add(servicer)
    port = server.bind("127.0.0.1:0")
    await server.start()
    key = (("x-api-key", keys["alice"]),)
    conn = await asyncio.to_thread(open_connection, port)
    try:
        no_key = send_request(conn, f"/{ECHO}", b"", end_stream=False)
        answer = await asyncio.to_thread(read_answer, conn, no_key, 5)
        assert answer.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0]
        first = send_request(
            conn, f"/{ECHO}", grpc_frame(pb.EchoRequest(message="x").SerializeToString()), metadata=key
        )
        assert (await asyncio.to_thread(read_answer, conn, first, 5)).grpc_status == 0  # the one token
        over = send_request(conn, f"/{ECHO}", b"", end_stream=False, metadata=key)
        answer = await asyncio.to_thread(read_answer, conn, over, 5)
        assert answer.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert answer.trailers is not None or answer.headers is not None
        assert (answer.trailers or answer.headers or {}).get("rpcframe-not-run") == "1"
    finally:
        conn.close()
        await server.stop(0)
    assert server.shed() == {"rate_limit": 1}
    assert servicer.calls == 1
