"""Deadlines, retries and hedging, live, with in-process backends on 127.0.0.1.

Three short scenes, each on its own thread-pool rpcframe servers (port 0; all
stopped together at the end of the act):

1. **Deadline propagation**: client -> relay -> backend with ``timeout=1.0``.
   The relay calls the backend asking for 30 s, yet both report (with
   ``rpcframe.time_remaining()``) the client's second, give or take grpc's
   rounding. Then the relay is slow: it sleeps past the deadline, and its
   call to the backend fails with ``DeadlineExceeded("... not sent ...")``;
   the backend never sees it.
2. **Retries from the contract**: three backends, ``b0`` failing every call
   with UNAVAILABLE. Echo (``NO_SIDE_EFFECTS``) calls all succeed, retried on
   another backend; ``BenchService/Record`` (no idempotency level) is sent
   to ``b0``, which records it and fails: the client does not run it again.
3. **Hedging**: every 50th call a backend serves stalls 300 ms (2 %); the
   same 500 sequential Echo calls without and with
   ``MethodConfig(hedge=HedgePolicy())``: p50/p99/max and the backups sent.

Exits 1 if any of these does not happen as described (a call that should
succeed fails, the backend sees an expired call, Record runs twice, ...).
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

import rpcframe
from examples.bench_server import BenchServicer
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc

ECHO = "rpcframe.echo.v1.EchoService/Echo"
SLOW_RELAY = 1.2  # seconds the slow relay sleeps before calling on (the client allows 1.0)
RETRY_CALLS = 40
STALL, STALL_EVERY = 0.3, 50  # every 50th call a backend serves stalls 300 ms: 2 %
HEDGE_CALLS, WARM_UP = 500, 100
# A sync channel's close() hands its grpc channels to a thread that closes them once grpc's
# connectivity poller (0.2 s period) has stopped, ~0.4 s later; a server stopped before then
# cancels the still-open connection and grpc logs a "Got goaway" line. So the act's servers
# all stop at its end, this long after the last channel closed.
CLOSE_SETTLE = 1.0


class Backends:
    """The act's in-process thread-pool rpcframe servers on 127.0.0.1:0, stopped together at its end."""

    def __init__(self) -> None:
        self._servers: list[rpcframe.Server] = []

    def serve(self, *servicers: Any) -> str:
        """Start one server with ``servicers``; returns its address."""
        server = rpcframe.Server(rpcframe.ServerConfig(grace_period=0, reflection=False))
        self._servers.append(server)
        for servicer in servicers:
            server.add(servicer)
        address = f"127.0.0.1:{server.bind('127.0.0.1:0')}"
        server.start()
        return address

    def stop_all(self) -> None:
        time.sleep(CLOSE_SETTLE)
        for server in self._servers:
            server.stop(0)


def wait_all_ready(channel: rpcframe.Channel, count: int, timeout: float = 10.0) -> None:
    """Block until the channel's ``count`` endpoints are all connected (so picks can use each one)."""
    deadline = time.monotonic() + timeout
    while sum(state == "READY" for _, state in channel.endpoints()) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"endpoints not ready within {timeout}s: {channel.endpoints()}")
        time.sleep(0.01)


# -- 1. deadline propagation -------------------------------------------------------


class DeadlineBackend(echo_pb2_grpc.EchoServiceServicer):
    """Answers with the seconds its handler had left, and counts the calls it saw."""

    def __init__(self) -> None:
        self.calls = 0

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        self.calls += 1
        return pb.EchoResponse(message=f"{rpcframe.time_remaining():.3f}")


class Relay(echo_pb2_grpc.EchoServiceServicer):
    """Calls the backend with ``timeout=30``; ``message="slow"`` sleeps past the deadline first."""

    def __init__(self, backend: str) -> None:
        self.channel = rpcframe.connect(backend)
        self.stub = self.channel.stub(echo_pb2_grpc.EchoServiceStub)
        self.outcomes: queue.Queue[str] = queue.Queue()

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        if request.message == "slow":
            time.sleep(SLOW_RELAY)
        left = rpcframe.time_remaining()
        try:
            answer = self.stub.Echo(pb.EchoRequest(message=request.message), timeout=30)
        except rpcframe.DeadlineExceeded as exc:
            self.outcomes.put(f"{type(exc).__name__}: {exc.details()}")
            raise
        self.outcomes.put(f"relay {left:.3f} backend {answer.message}")
        return pb.EchoResponse(message=f"{left:.3f} {answer.message}")


def deadlines(backends: Backends) -> bool:
    backend = DeadlineBackend()
    backend_addr = backends.serve(backend)
    relay = Relay(backend_addr)
    relay_addr = backends.serve(relay)
    try:
        with rpcframe.connect(relay_addr) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            stub.Echo(pb.EchoRequest(message="warm-up"), timeout=5)  # connections up on both hops
            relay.outcomes.get(timeout=5)
            before = backend.calls
            start = time.perf_counter()
            answer = stub.Echo(pb.EchoRequest(message="hi"), timeout=1.0).message
            relay_left, backend_left = map(float, answer.split())
            ms = (time.perf_counter() - start) * 1000
            relay.outcomes.get(timeout=5)
            print(f"client -> relay {relay_addr} -> backend {backend_addr}, client timeout=1.0 s")
            print(f"  relay   had {relay_left:.3f} s left when it called the backend asking for timeout=30")
            print(f"  backend had {backend_left:.3f} s left: the client's deadline, not 30 s"
                  f" (answered in {ms:.1f} ms; grpc rounds each hop's timeout up a few ms)")  # fmt: skip
            start = time.perf_counter()
            try:
                stub.Echo(pb.EchoRequest(message="slow"), timeout=1.0)
                client = "answered (unexpected)"
            except rpcframe.DeadlineExceeded as exc:
                client = f"{exc.code().name} after {time.perf_counter() - start:.2f} s"
            outcome = relay.outcomes.get(timeout=SLOW_RELAY + 5)
            seen = backend.calls - before - 1
            print(f"slow relay (sleeps {SLOW_RELAY} s first), client timeout=1.0 s: client got {client}")
            print(f"  relay's call to the backend: {outcome}")
            print(f"  backend saw {seen} call(s) from it")
    finally:
        relay.channel.close()
    return 0.9 < backend_left < 1.05 and 0.9 < relay_left < 1.05 and "not sent" in outcome and seen == 0


# -- 2. retries from the contract --------------------------------------------------


class FlakyEcho(echo_pb2_grpc.EchoServiceServicer):
    """Echo answering with its name, or failing every call with UNAVAILABLE; counts attempts."""

    def __init__(self, name: str, failing: bool) -> None:
        self.name, self.failing = name, failing
        self.attempts = 0
        self._lock = threading.Lock()

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        with self._lock:
            self.attempts += 1
        if self.failing:
            raise rpcframe.Unavailable(f"{self.name} fails every call")
        return pb.EchoResponse(message=self.name)


class Ledger(BenchServicer):
    """BenchService whose Record counts per key; a failing one records, then fails with UNAVAILABLE."""

    def __init__(self, name: str, failing: bool) -> None:
        super().__init__(server_id=name)
        self.failing = failing
        self.recorded: collections.Counter[str] = collections.Counter()

    def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:
        response = super().Record(request, context)
        self.recorded[request.key] = response.times
        if self.failing:
            raise rpcframe.Unavailable(f"{self.server_id} recorded {request.key!r}, then failed")
        return response


def retries(backends: Backends) -> bool:
    names = ("b0", "b1", "b2")
    echoes = [FlakyEcho(n, failing=n == "b0") for n in names]
    ledgers = [Ledger(n, failing=n == "b0") for n in names]
    addresses = [backends.serve(echo, ledger) for echo, ledger in zip(echoes, ledgers, strict=True)]
    # round_robin keeps sending b0 its share until outlier ejection takes it out.
    config = rpcframe.ChannelConfig(default_timeout=5, slow_start=0, policy="round_robin")
    with rpcframe.connect(addresses, config) as channel:
        wait_all_ready(channel, len(addresses))
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        answered: collections.Counter[str] = collections.Counter()
        for _ in range(RETRY_CALLS):
            try:
                answered[stub.Echo(pb.EchoRequest(message="hi")).message] += 1
            except grpc.RpcError as exc:
                answered[f"failed {exc.code().name}"] += 1
        ok = sum(answered[n] for n in names)
        attempts = ", ".join(f"{e.name} {e.attempts}" for e in echoes)
        print(f"backends b0={addresses[0]} (fails every call: UNAVAILABLE), b1={addresses[1]}, b2={addresses[2]}")
        print(f"{RETRY_CALLS} x Echo (NO_SIDE_EFFECTS), policy {config.policy}: {ok} ok, "
              f"{RETRY_CALLS - ok} failed; attempts served: {attempts}")  # fmt: skip
        print(f"  channel.stats.retries={channel.stats.retries}: each failed attempt on b0 retried on b1/b2, "
              f"until b0 was ejected after {config.outlier.consecutive_failures} consecutive failures")  # fmt: skip
    # pick_first sends every call to b0 first, so Record meets the failing backend.
    config = rpcframe.ChannelConfig(default_timeout=5, slow_start=0, policy="pick_first")
    with rpcframe.connect(addresses, config) as channel:
        wait_all_ready(channel, len(addresses))
        bench = channel.stub(bench_pb2_grpc.BenchServiceStub)
        try:
            bench.Record(bench_pb2.RecordRequest(key="order-42"))
            record = "answered (unexpected)"
        except rpcframe.Unavailable as exc:
            record = f"{exc.code().name} ({exc.details()})"
        record_retries = channel.stats.retries
        runs = sum(ledger.recorded["order-42"] for ledger in ledgers)
        per_backend = ", ".join(f"{x.server_id} {x.recorded['order-42']}" for x in ledgers)
        print(f"Record (no idempotency level), policy pick_first -> b0: {record}")
        print(f"  channel.stats.retries={record_retries}; 'order-42' recorded {runs} time(s) in all: {per_backend}")
        b0_before = echoes[0].attempts
        echo = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="hi")).message
        b0_tried = echoes[0].attempts - b0_before
        print(f"  Echo on the same channel -> b0 fails, retried: answered by {echo}, "
              f"channel.stats.retries={channel.stats.retries}")  # fmt: skip
    return ok == RETRY_CALLS and runs == 1 and record_retries == 0 and b0_tried == 1 and echo != "b0"


# -- 3. hedging ----------------------------------------------------------------------


class StallingEcho(echo_pb2_grpc.EchoServiceServicer):
    """Echo whose every ``STALL_EVERY``-th call stalls ``STALL`` seconds."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def Echo(self, request: pb.EchoRequest, context: Any) -> pb.EchoResponse:
        with self._lock:
            self.calls += 1
            stall = self.calls % STALL_EVERY == 0
        if stall:
            time.sleep(STALL)
        return pb.EchoResponse(message=request.message)


def _percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def hedged_run(addresses: list[str], config: rpcframe.ChannelConfig) -> tuple[list[float], int, dict[str, int]]:
    """HEDGE_CALLS sequential Echo calls after a warm-up: sorted latencies (ms), failures, channel stats of them."""
    with rpcframe.connect(addresses, config) as channel:
        wait_all_ready(channel, len(addresses))
        call: Callable[..., Any] = channel.stub(echo_pb2_grpc.EchoServiceStub).Echo
        request = pb.EchoRequest(message="x")
        for _ in range(WARM_UP):  # the adaptive delay needs recent latencies (50 at least)
            call(request)
        before = channel.stats.as_dict()
        latencies, failed = [], 0
        for _ in range(HEDGE_CALLS):
            start = time.perf_counter()
            try:
                call(request)
            except grpc.RpcError:
                failed += 1
            latencies.append((time.perf_counter() - start) * 1000)
        stats = {k: v - before[k] for k, v in channel.stats.as_dict().items()}
    return sorted(latencies), failed, stats


def hedging(backends: Backends) -> bool:
    stalling = [StallingEcho() for _ in range(3)]
    addresses = [backends.serve(echo) for echo in stalling]
    plain = rpcframe.ChannelConfig(default_timeout=5, slow_start=0)
    hedged = rpcframe.ChannelConfig(default_timeout=5, slow_start=0,
                                    methods={ECHO: rpcframe.MethodConfig(hedge=rpcframe.HedgePolicy())})  # fmt: skip
    print(f"3 backends; every {STALL_EVERY}th call a backend serves stalls {STALL * 1000:.0f} ms"
          f" ({100 / STALL_EVERY:.0f} %); {HEDGE_CALLS} sequential Echo calls each way,"
          f" after {WARM_UP} warm-up calls\n")  # fmt: skip
    print(f"{'':<16} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'total s':>8}  failed  extra load (channel.stats)")
    all_ok = True
    for name, config in (("without hedging", plain), ("hedged", hedged)):
        latencies, failed, stats = hedged_run(addresses, config)
        hedges = stats["hedges"]
        print(f"{name:<16} {_percentile(latencies, 0.5):>7.2f} {_percentile(latencies, 0.99):>7.2f} "
              f"{latencies[-1]:>7.2f} {sum(latencies) / 1000:>8.2f}  {failed:>6}  "
              f"{hedges:>2} backups ({100 * hedges / HEDGE_CALLS:.1f} %), {stats['hedge_wins']} won, "
              f"{stats['budget_refused']} refused by the 5 % budget")  # fmt: skip
        all_ok = all_ok and failed == 0
    print(f"\nhedging cuts p99; max can stay ~{STALL * 1000:.0f} ms when a backup lands on a stalling"
          " call too (2 copies at most) or the budget refuses one")  # fmt: skip
    return all_ok


def main() -> int:
    """Run the three scenes; returns the exit code."""
    ok = True
    backends = Backends()
    try:
        for title, scene in (("deadline propagation", deadlines), ("retries from the contract", retries),
                             ("hedging", hedging)):  # fmt: skip
            print(f"-- {title} --\n")
            if not scene(backends):
                print(f"\n{title}: not as expected")
                ok = False
            print()
    finally:
        backends.stop_all()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
