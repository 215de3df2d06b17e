"""Closed-loop load for the reliability suite: rpcframe or raw grpcio clients, threads or asyncio.

Every call carries a unique request id, ``TAG.KIND<caller>.<n>``
(``BenchRequest.payload`` / ``RecordRequest.key``), and the client notes the wall-clock time its deadline
passes, so the backends' execution logs (``benchmarks.reliability_servers``)
tell duplicates and executions after the caller gave up.

asyncio callers run on one event loop in a background thread
(:func:`aio_loop`) for the whole suite: grpc.aio binds to the first loop it
sees, and the fault scripts stay plain sequential code.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2

import rpcframe
import rpcframe.aio
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

#: unary and stream: idempotent (NO_SIDE_EFFECTS); record: not idempotent; refused: a Record whose
#: handler fails with ConnectionRefusedError after its side effect (benchmarks.reliability_servers).
KINDS = ("unary", "stream", "record", "refused")
STREAM_MESSAGES = 5
_UNARY_DELAY = duration_pb2.Duration(nanos=5_000_000)  # calls are in flight when a fault lands
_STREAM_DELAY = duration_pb2.Duration(nanos=10_000_000)  # per message: a 50 ms stream
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
#: Upper bounds on any one load, whatever the scenario asks.
MAX_CALLS_PER_CALLER, MAX_SECONDS = 1_000_000, 600.0

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def aio_loop() -> asyncio.AbstractEventLoop:
    """The suite's one asyncio loop (uvloop when installed), running on a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None:
            try:
                import uvloop

                loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="reliability-aio", daemon=True).start()
            _loop = loop
        return _loop


def run_aio(coro: Awaitable[Any], within: float | None = None) -> Any:
    """Run ``coro`` on :func:`aio_loop` and wait for its result (at most ``within`` s)."""
    future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, aio_loop())  # type: ignore[arg-type]
    return future.result(within)


@dataclass
class Tally:
    """What the callers saw, per kind of call."""

    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)  # "kind CODE"
    served_by: collections.Counter[str] = field(default_factory=collections.Counter)  # server_id
    deadlines: dict[str, float] = field(default_factory=dict)  # request id -> wall time its deadline passes
    ok_ids: set[str] = field(default_factory=set)

    def merge(self, other: Tally) -> None:
        """Add ``other``'s counts to this one."""
        for mine, theirs in ((self.sent, other.sent), (self.failed, other.failed), (self.codes, other.codes),
                             (self.served_by, other.served_by)):  # fmt: skip
            mine.update(theirs)
        self.deadlines.update(other.deadlines)
        self.ok_ids |= other.ok_ids

    def failure(self, kind: str, code: str) -> None:
        """Count one failed call."""
        self.failed[kind] += 1
        self.codes[f"{kind} {code}"] += 1


def _unary_request(rid: str) -> bench_pb2.BenchRequest:
    return bench_pb2.BenchRequest(payload=rid.encode(), delay=_UNARY_DELAY)


def _stream_request(rid: str) -> bench_pb2.BenchRequest:
    return bench_pb2.BenchRequest(payload=rid.encode(), count=STREAM_MESSAGES, delay=_STREAM_DELAY)


class _ShortStream(Exception):
    """A server stream that ended OK with fewer messages than asked for."""


def _sync_calls(stub: Any, timeout: float) -> dict[str, Callable[[str], str]]:
    """One function per kind: make the call with id ``rid``, return the answering server's id."""

    def unary(rid: str) -> str:
        return str(stub.Unary(_unary_request(rid), timeout=timeout).server_id)

    def stream(rid: str) -> str:
        responses = list(stub.ServerStream(_stream_request(rid), timeout=timeout))
        if len(responses) != STREAM_MESSAGES:
            raise _ShortStream
        return str(responses[-1].server_id)

    def record(rid: str) -> str:
        return str(stub.Record(bench_pb2.RecordRequest(key=rid), timeout=timeout).server_id)

    return {"unary": unary, "stream": stream, "record": record, "refused": record}


def _aio_calls(stub: Any, timeout: float) -> dict[str, Callable[[str], Awaitable[str]]]:
    """:func:`_sync_calls` for asyncio stubs."""

    async def unary(rid: str) -> str:
        return str((await stub.Unary(_unary_request(rid), timeout=timeout)).server_id)

    async def stream(rid: str) -> str:
        responses = [r async for r in stub.ServerStream(_stream_request(rid), timeout=timeout)]
        if len(responses) != STREAM_MESSAGES:
            raise _ShortStream
        return str(responses[-1].server_id)

    async def record(rid: str) -> str:
        return str((await stub.Record(bench_pb2.RecordRequest(key=rid), timeout=timeout)).server_id)

    return {"unary": unary, "stream": stream, "record": record, "refused": record}


def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return exc.code().name  # type: ignore[no-any-return]
    return "SHORT_STREAM" if isinstance(exc, _ShortStream) else type(exc).__name__


def _raw_target(addresses: Sequence[str]) -> str:
    return "ipv4:" + ",".join(addresses)


class Load:
    """Callers (``mix``: kind -> how many) against ``addresses`` until :meth:`stop`.

    ``stack`` is ``rpcframe`` (its balanced channel, default config) or
    ``grpcio`` (one raw channel, grpc's round_robin); ``front`` is ``sync``
    (a thread per caller) or ``aio`` (a task per caller on :func:`aio_loop`).
    """

    def __init__(self, stack: str, front: str, addresses: Sequence[str], mix: dict[str, int], timeout: float,
                 tag: str) -> None:  # fmt: skip
        self.stack, self.front, self.addresses = stack, front, list(addresses)
        self.mix, self.timeout, self.tag = mix, timeout, tag
        self._stop = threading.Event()
        self._tallies: list[Tally] = []
        self._threads: list[threading.Thread] = []
        self._aio_done: Future[None] | None = None
        self._channel: Any = None

    def _ids(self, kind: str, index: int, tally: Tally) -> Iterator[str]:
        """One caller's request ids, each counted as sent with its deadline; bounded in count and time."""
        end = time.monotonic() + MAX_SECONDS
        for seq in range(MAX_CALLS_PER_CALLER):
            if self._stop.is_set() or time.monotonic() > end:
                return
            rid = f"{self.tag}.{kind}{index}.{seq}"
            tally.sent[kind] += 1
            tally.deadlines[rid] = time.time() + self.timeout
            yield rid

    # -- sync ----------------------------------------------------------------------------

    def _sync_channel(self) -> Any:
        if self.stack == "rpcframe":
            return rpcframe.connect(self.addresses, rpcframe.ChannelConfig())
        return grpc.insecure_channel(_raw_target(self.addresses), options=[("grpc.service_config", _ROUND_ROBIN)])

    def _sync_worker(self, call: Callable[[str], str], kind: str, index: int, tally: Tally) -> None:
        for rid in self._ids(kind, index, tally):
            try:
                tally.served_by[call(rid)] += 1
                tally.ok_ids.add(rid)
            except Exception as exc:  # every failure is counted, none ends the caller
                tally.failure(kind, _code(exc))

    def _start_sync(self, within: float) -> None:
        self._channel = self._sync_channel()
        stub = bench_pb2_grpc.BenchServiceStub(self._channel) if self.stack == "grpcio" else \
            self._channel.stub(bench_pb2_grpc.BenchServiceStub)  # fmt: skip
        _warm_up_sync(stub, len(self.addresses), within)
        calls = _sync_calls(stub, self.timeout)
        for kind, count in self.mix.items():
            for index in range(count):
                tally = Tally()
                self._tallies.append(tally)
                thread = threading.Thread(target=self._sync_worker, args=(calls[kind], kind, index, tally),
                                          daemon=True)  # fmt: skip
                thread.start()
                self._threads.append(thread)

    # -- asyncio -------------------------------------------------------------------------

    async def _aio_run(self, ready: threading.Event, within: float) -> None:
        if self.stack == "rpcframe":
            channel: Any = rpcframe.aio.connect(self.addresses, rpcframe.ChannelConfig())
            stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        else:
            channel = grpc.aio.insecure_channel(_raw_target(self.addresses),
                                                options=[("grpc.service_config", _ROUND_ROBIN)])  # fmt: skip
            stub = bench_pb2_grpc.BenchServiceStub(channel)
        try:
            await _warm_up_aio(stub, len(self.addresses), within)
            ready.set()
            calls = _aio_calls(stub, self.timeout)
            workers = []
            for kind, count in self.mix.items():
                for index in range(count):
                    tally = Tally()
                    self._tallies.append(tally)
                    workers.append(self._aio_worker(calls[kind], kind, index, tally))
            await asyncio.gather(*workers)
        finally:
            await channel.close()

    async def _aio_worker(self, call: Callable[[str], Awaitable[str]], kind: str, index: int, tally: Tally) -> None:
        for rid in self._ids(kind, index, tally):
            try:
                tally.served_by[await call(rid)] += 1
                tally.ok_ids.add(rid)
            except Exception as exc:  # every failure is counted, none ends the caller
                tally.failure(kind, _code(exc))

    # -- both ----------------------------------------------------------------------------

    def start(self, within: float = 10.0) -> None:
        """Connect, warm up until every backend has answered (bounded), then start the callers."""
        if self.front == "sync":
            self._start_sync(within)
            return
        ready = threading.Event()
        self._aio_done = asyncio.run_coroutine_threadsafe(self._aio_run(ready, within), aio_loop())
        while not ready.wait(0.05):
            if self._aio_done.done():
                self._aio_done.result()  # raises the warm-up's error

    def stop(self, within: float = 30.0) -> Tally:
        """Stop sending new calls, wait for those in flight (at most ``within`` s), close; the merged tally."""
        self._stop.set()
        if self._aio_done is not None:
            self._aio_done.result(within)
        deadline = time.monotonic() + within
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._channel is not None:
            self._channel.close()
        total = Tally()
        for tally in self._tallies:
            total.merge(tally)
        return total


def _warm_up_sync(stub: Any, backends: int, within: float) -> None:
    """Unary calls until ``backends`` distinct servers have answered, or ``within`` s passed."""
    seen: set[str] = set()
    deadline = time.monotonic() + within
    while len(seen) < backends and time.monotonic() < deadline:
        try:
            seen.add(stub.Unary(bench_pb2.BenchRequest(), timeout=2).server_id)
        except grpc.RpcError:
            time.sleep(0.01)  # not connected yet: paced, bounded by the deadline


async def _warm_up_aio(stub: Any, backends: int, within: float) -> None:
    """:func:`_warm_up_sync` for asyncio stubs."""
    seen: set[str] = set()
    deadline = time.monotonic() + within
    while len(seen) < backends and time.monotonic() < deadline:
        try:
            seen.add((await stub.Unary(bench_pb2.BenchRequest(), timeout=2)).server_id)
        except grpc.RpcError:
            await asyncio.sleep(0.01)
