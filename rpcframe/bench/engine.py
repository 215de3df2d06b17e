"""The load loops of one load-generator process.

:class:`LoadRun` opens the channels, waits until the target is ready, runs
an unrecorded warmup, then the measured phase, and returns a
:class:`~rpcframe.bench.histogram.Partial`.

- sync mode: one thread per caller on grpc's blocking API.
- aio mode: one coroutine per caller on grpc.aio, on uvloop or asyncio.
- closed loop: each caller sends its next call when the previous one ends.
- open loop: callers take the next slot of one
  :class:`~rpcframe.bench.schedule.OpenLoopSchedule`, sleep until it is due
  and record latency from the due time, so a stalled server is charged for
  the calls queued behind the stall. ``concurrency`` bounds the calls in
  flight; when all callers are busy, later slots start late and that
  lateness is part of their latency (and counted in ``late``). Sleeps on
  uvloop have millisecond granularity, which bounds open-loop precision.

The per-call path does a call, two clock reads and one recorder update; no
allocation or logging beyond what grpc itself does.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio

from .. import _loop
from ..config import ChannelConfig
from ..errors import RpcframeError
from .histogram import Partial, Recorder
from .schedule import OpenLoopSchedule
from .spec import BenchError, LoadSpec

__all__ = ["LoadRun", "StreamEnded"]

# grpc shares one TCP connection between channels with equal arguments;
# a local subchannel pool gives every channel its own (--connections).
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.use_local_subchannel_pool", 1),)
# An open-loop send starting later than this after its due time counts as late.
_LATE = 0.001
# Extra seconds a phase may take beyond its time limit plus one call timeout.
_JOIN_SLACK = 5.0

SyncCaller = Callable[[], int]
AioCaller = Callable[[], Awaitable[int]]


class StreamEnded(Exception):
    """The server closed a ping-pong stream without answering."""


class LoadRun:
    """One process's share of a load run.

    Args:
        spec: what to run.
        on_measure_start: called right before the measured phase (after
            connecting and warmup), e.g. to sample the server's CPU time or
            to wait for the other load-generator processes.
        on_measure_end: called right after the measured phase.
    """

    def __init__(
        self,
        spec: LoadSpec,
        *,
        on_measure_start: Callable[[], None] | None = None,
        on_measure_end: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self._on_start = on_measure_start
        self._on_end = on_measure_end
        self._recorders: list[Recorder] = []
        #: "connecting", "warmup", "measuring" or "done"
        self.phase = "connecting"
        #: ``time.perf_counter()`` when the measured phase began
        self.measure_start: float | None = None

    def completed(self) -> int:
        """Calls finished in the measured phase so far (safe from any thread)."""
        return sum(r.calls for r in self._recorders)

    def run(self) -> Partial:
        """Connect, warm up, measure; the measured phase's counts and latencies."""
        if self.spec.mode == "aio":
            return _loop.run(self._run_aio(), use_uvloop=self.spec.uvloop)
        return self._run_sync()

    # -- shared --------------------------------------------------------------

    def _stream_timeout(self) -> float:
        # A ping-pong stream lives for the whole run.
        return self.spec.warmup + self.spec.time_limit + self.spec.call_timeout

    def _measure_started(self) -> tuple[float, float]:
        if self._on_start is not None:
            self._on_start()
        self.phase = "measuring"
        self.measure_start = time.perf_counter()
        t = os.times()
        return t.user, t.system

    def _measure_ended(self, cpu0: tuple[float, float], elapsed: float, recorders: list[Recorder]) -> Partial:
        t = os.times()
        cpu = (t.user - cpu0[0], t.system - cpu0[1])
        self.phase = "done"
        if self._on_end is not None:
            self._on_end()
        return Partial.from_recorders(recorders, elapsed, cpu)

    def _multicallable(self, channel: Any, response_class: Any) -> Any:
        factory = getattr(channel, self.spec.method.kind)
        # Requests are serialized once up front: None sends the bytes as they are.
        mc = factory(self.spec.method.path, request_serializer=None,
                     response_deserializer=response_class.FromString, _registered_method=True)  # fmt: skip
        metadata = self._raw_metadata()
        # rpcframe channels send the spec's metadata and token themselves (ChannelConfig).
        return functools.partial(mc, metadata=metadata) if metadata else mc

    def _raw_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        spec = self.spec
        if spec.client != "raw":
            return ()
        token = (("authorization", f"Bearer {spec.token}"),) if spec.token is not None else ()
        return (*spec.metadata, *token)

    def _channel_config(self) -> ChannelConfig:
        spec = self.spec
        return ChannelConfig(grpc_options=_CHANNEL_OPTIONS, metadata=spec.metadata, tls=spec.tls, token=spec.token)

    def _raw_secure(self) -> tuple[Any, tuple[tuple[str, Any], ...]]:
        """Credentials and channel options of a raw TLS channel."""
        from ..security.tls import channel_credentials

        tls = self.spec.tls
        assert tls is not None
        override = (("grpc.ssl_target_name_override", tls.server_name),) if tls.server_name else ()
        return channel_credentials(tls), (*_CHANNEL_OPTIONS, *override)

    def _connect_error(self) -> BenchError:
        return BenchError(f"cannot connect to {self.spec.target} within {self.spec.connect_timeout:g}s")

    # -- sync ----------------------------------------------------------------

    def _open_sync(self) -> Any:
        if self.spec.client == "raw":
            if self.spec.tls is None:
                return grpc.insecure_channel(self.spec.target, options=_CHANNEL_OPTIONS)
            credentials, options = self._raw_secure()
            return grpc.secure_channel(self.spec.target, credentials, options=options)
        from ..client._sync import connect

        return connect(self.spec.target, self._channel_config())

    def _wait_sync(self, channel: Any) -> None:
        try:
            if self.spec.client == "raw":
                grpc.channel_ready_future(channel).result(timeout=self.spec.connect_timeout)
            else:
                channel.wait_ready(self.spec.connect_timeout)
        except (grpc.FutureTimeoutError, RpcframeError):
            raise self._connect_error() from None

    def _sync_caller(self, mc: Any) -> SyncCaller:
        spec = self.spec
        request, timeout = spec.request, spec.call_timeout
        kind = spec.method.kind
        if kind == "unary_unary":

            def unary() -> int:
                mc(request, timeout=timeout)
                return 1

            return unary
        if kind == "unary_stream":

            def server_stream() -> int:
                n = 0
                for _ in mc(request, timeout=timeout):
                    n += 1
                return n

            return server_stream
        if kind == "stream_unary":
            requests = (request,) * spec.stream_messages

            def client_stream() -> int:
                mc(iter(requests), timeout=timeout)
                return len(requests)

            return client_stream
        return _SyncPingPong(mc, request, self._stream_timeout())

    def _run_sync(self) -> Partial:
        spec = self.spec
        _, response_class = spec.method.message_classes()
        channels = [self._open_sync() for _ in range(spec.connections)]
        callers: list[SyncCaller] = []
        try:
            for channel in channels:
                self._wait_sync(channel)
            mcs = [self._multicallable(channel, response_class) for channel in channels]
            callers = [self._sync_caller(mcs[i % len(mcs)]) for i in range(spec.concurrency)]
            if spec.warmup > 0:
                self.phase = "warmup"
                self._phase_sync(callers, spec.warmup, None, record=False)
            cpu0 = self._measure_started()
            start = time.perf_counter()
            recorders = self._phase_sync(callers, spec.time_limit, spec.total, record=True)
            return self._measure_ended(cpu0, time.perf_counter() - start, recorders)
        finally:
            for caller in callers:
                if isinstance(caller, _SyncPingPong):
                    caller.close()
            for channel in channels:
                channel.close()

    def _phase_sync(
        self, callers: list[SyncCaller], seconds: float, total: int | None, *, record: bool
    ) -> list[Recorder]:
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        recorders = [Recorder(t0) for _ in callers]
        if record:
            self._recorders = recorders
        claim = itertools.count()  # next() on it is atomic under the GIL
        schedule = None if self.spec.rps is None else OpenLoopSchedule(self.spec.rps, t0, seconds, total)
        threads = []
        for caller, rec in zip(callers, recorders, strict=True):
            if schedule is not None:
                args: tuple[Any, ...] = (caller, rec, stop_at, claim, schedule)
                target: Callable[..., None] = _sync_open_loop
            else:
                args = (caller, rec, stop_at, claim if total is not None else None, total)
                target = _sync_closed_loop
            threads.append(threading.Thread(target=target, args=args, daemon=True, name="rpcframe-bench"))
        for thread in threads:
            thread.start()
        deadline = stop_at + self.spec.call_timeout + _JOIN_SLACK
        for thread in threads:
            thread.join(max(0.0, deadline - time.perf_counter()))
        if any(t.is_alive() for t in threads):
            raise BenchError(f"callers still busy {self.spec.call_timeout + _JOIN_SLACK:g}s after the phase ended")
        return recorders

    # -- asyncio -------------------------------------------------------------

    def _open_aio(self) -> Any:
        if self.spec.client == "raw":
            if self.spec.tls is None:
                return grpc.aio.insecure_channel(self.spec.target, options=_CHANNEL_OPTIONS)
            credentials, options = self._raw_secure()
            return grpc.aio.secure_channel(self.spec.target, credentials, options=options)
        from ..client._aio import connect

        return connect(self.spec.target, self._channel_config())

    def _aio_caller(self, mc: Any) -> AioCaller:
        spec = self.spec
        request, timeout = spec.request, spec.call_timeout
        kind = spec.method.kind
        if kind == "unary_unary":

            async def unary() -> int:
                await mc(request, timeout=timeout)
                return 1

            return unary
        if kind == "unary_stream":

            async def server_stream() -> int:
                n = 0
                async for _ in mc(request, timeout=timeout):
                    n += 1
                return n

            return server_stream
        if kind == "stream_unary":
            requests = (request,) * spec.stream_messages

            async def client_stream() -> int:
                await mc(iter(requests), timeout=timeout)
                return len(requests)

            return client_stream
        return _AioPingPong(mc, request, self._stream_timeout())

    async def _run_aio(self) -> Partial:
        spec = self.spec
        _, response_class = spec.method.message_classes()
        channels = [self._open_aio() for _ in range(spec.connections)]
        callers: list[AioCaller] = []
        try:
            for channel in channels:
                try:
                    await asyncio.wait_for(channel.channel_ready(), spec.connect_timeout)
                except TimeoutError:
                    raise self._connect_error() from None
            mcs = [self._multicallable(channel, response_class) for channel in channels]
            callers = [self._aio_caller(mcs[i % len(mcs)]) for i in range(spec.concurrency)]
            if spec.warmup > 0:
                self.phase = "warmup"
                await self._phase_aio(callers, spec.warmup, None, record=False)
            cpu0 = self._measure_started()
            start = time.perf_counter()
            recorders = await self._phase_aio(callers, spec.time_limit, spec.total, record=True)
            return self._measure_ended(cpu0, time.perf_counter() - start, recorders)
        finally:
            for caller in callers:
                if isinstance(caller, _AioPingPong):
                    caller.close()
            for channel in channels:
                await channel.close()

    async def _phase_aio(
        self, callers: list[AioCaller], seconds: float, total: int | None, *, record: bool
    ) -> list[Recorder]:
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        recorders = [Recorder(t0) for _ in callers]
        if record:
            self._recorders = recorders
        claim = itertools.count()
        if self.spec.rps is not None:
            schedule = OpenLoopSchedule(self.spec.rps, t0, seconds, total)
            coros = [_aio_open_loop(c, r, stop_at, claim, schedule) for c, r in zip(callers, recorders, strict=True)]
        else:
            shared = claim if total is not None else None
            coros = [_aio_closed_loop(c, r, stop_at, shared, total) for c, r in zip(callers, recorders, strict=True)]
        tasks = [asyncio.ensure_future(c) for c in coros]
        _, pending = await asyncio.wait(tasks, timeout=seconds + self.spec.call_timeout + _JOIN_SLACK)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_JOIN_SLACK)
            raise BenchError(f"callers still busy {self.spec.call_timeout + _JOIN_SLACK:g}s after the phase ended")
        for task in tasks:
            task.result()  # a bug in a loop must not pass silently
        return recorders


# -- the loops (module functions; hot names bound to locals, the fastest lookup) --


def _sync_closed_loop(
    call: SyncCaller,
    rec: Recorder,
    stop_at: float,
    claim: Iterator[int] | None,
    total: int | None,
    perf: Callable[[], float] = time.perf_counter,
) -> None:
    """One closed-loop caller: the next call starts when the previous one ends."""
    success, failure = rec.success, rec.failure
    while True:
        if claim is not None and next(claim) >= total:  # type: ignore[operator]
            return
        start = perf()
        if start >= stop_at:
            return
        try:
            n = call()
        except Exception as exc:  # noqa: BLE001 - every failure is a counted outcome
            failure(perf(), exc)
        else:
            success(start, perf(), n)


def _sync_open_loop(
    call: SyncCaller,
    rec: Recorder,
    stop_at: float,
    claim: Iterator[int],
    schedule: OpenLoopSchedule,
    perf: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """One open-loop caller (tests pass a fake clock as ``perf``/``sleep``)."""
    success, failure = rec.success, rec.failure
    limit = schedule.count()
    while True:
        i = next(claim)
        if limit is not None and i >= limit:
            return
        due = schedule.send_time(i)
        if due >= stop_at:
            return
        now = perf()
        if now - due > _LATE:
            rec.late += 1
        while now < due:
            sleep(due - now)
            now = perf()
        try:
            n = call()
        except Exception as exc:  # noqa: BLE001
            failure(perf(), exc)
        else:
            success(due, perf(), n)


async def _aio_closed_loop(
    call: AioCaller, rec: Recorder, stop_at: float, claim: Iterator[int] | None, total: int | None
) -> None:
    """:func:`_sync_closed_loop` on asyncio."""
    perf = time.perf_counter
    success, failure = rec.success, rec.failure
    while True:
        if claim is not None and next(claim) >= total:  # type: ignore[operator]
            return
        start = perf()
        if start >= stop_at:
            return
        try:
            n = await call()
        except Exception as exc:  # noqa: BLE001
            failure(perf(), exc)
        else:
            success(start, perf(), n)


async def _aio_open_loop(
    call: AioCaller, rec: Recorder, stop_at: float, claim: Iterator[int], schedule: OpenLoopSchedule
) -> None:
    """:func:`_sync_open_loop` on asyncio."""
    perf, sleep = time.perf_counter, asyncio.sleep
    success, failure = rec.success, rec.failure
    limit = schedule.count()
    while True:
        i = next(claim)
        if limit is not None and i >= limit:
            return
        due = schedule.send_time(i)
        if due >= stop_at:
            return
        now = perf()
        if now - due > _LATE:
            rec.late += 1
        # uvloop timers have 1 ms granularity and may fire early: never send before the due time.
        while now < due:
            await sleep(due - now)
            now = perf()
        try:
            n = await call()
        except Exception as exc:  # noqa: BLE001
            failure(perf(), exc)
        else:
            success(due, perf(), n)


# -- ping-pong streams ---------------------------------------------------------


class _SyncPingPong:
    """One long-lived bidi stream; each call writes one request and reads one answer.

    grpc's blocking API takes requests from an iterator on its own thread,
    so requests go through a queue that the iterator blocks on.
    """

    def __init__(self, mc: Any, request: bytes, timeout: float) -> None:
        self._mc = mc
        self._request = request
        self._timeout = timeout
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._responses: Any = None

    @staticmethod
    def _requests(q: queue.SimpleQueue[bytes | None]) -> Iterator[bytes]:
        while (item := q.get()) is not None:
            yield item

    def __call__(self) -> int:
        responses = self._responses
        if responses is None:
            self._queue = queue.SimpleQueue()
            responses = self._responses = self._mc(self._requests(self._queue), timeout=self._timeout)
        self._queue.put(self._request)
        try:
            next(responses)
        except StopIteration:
            self.close()
            raise StreamEnded("the server ended the ping-pong stream") from None
        except BaseException:
            self.close()
            raise
        return 1

    def close(self) -> None:
        """End the stream (a new one opens on the next call)."""
        if self._responses is not None:
            self._queue.put(None)  # ends the request iterator's thread
            self._responses.cancel()
            self._responses = None


class _AioPingPong:
    """One long-lived grpc.aio bidi stream driven with write()/read()."""

    def __init__(self, mc: Any, request: bytes, timeout: float) -> None:
        self._mc = mc
        self._request = request
        self._timeout = timeout
        self._call: Any = None

    async def __call__(self) -> int:
        call = self._call
        if call is None:
            call = self._call = self._mc(timeout=self._timeout)
        try:
            await call.write(self._request)
            response = await call.read()
        except BaseException:
            self.close()
            raise
        if response is grpc.aio.EOF:
            self.close()
            raise StreamEnded("the server ended the ping-pong stream")
        return 1

    def close(self) -> None:
        """End the stream (a new one opens on the next call)."""
        if self._call is not None:
            self._call.cancel()
            self._call = None
