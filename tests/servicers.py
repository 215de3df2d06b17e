"""Echo servicers whose request message scripts what the handler does.

``"raise:NotFound:text"`` raises ``rpcframe.NotFound("text")``;
``"py:ValueError:text"`` raises a builtin exception; ``"sleep:0.3"`` sleeps;
``"block"`` waits until the test sets ``release``; ``"abort:NOT_FOUND:text"``
calls ``context.abort``. Anything else is echoed. Each servicer counts calls
and records cancellations so tests can assert on the server's view.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
import time
from typing import Any

import grpc

import rpcframe
from examples.bench_server import AioBenchServicer, BenchServicer
from examples.echo import AioEchoServicer, EchoServicer
from generated.rpcframe.bench.v1 import bench_pb2
from generated.rpcframe.echo.v1 import echo_pb2


def _error(kind: str, name: str, text: str) -> BaseException:
    if kind == "raise":
        cls = getattr(rpcframe, name)
        return cls(text, trailing_metadata=(("x-error-ref", "42"),)) if text else cls()
    return getattr(builtins, name)(text)


class ScriptedEcho(EchoServicer):
    """Thread-pool servicer driven by the request message."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name or os.environ.get("RPCFRAME_SERVER_ID", "")
        self.failing = False  # when set, every Echo fails with UNAVAILABLE
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        self.calls += 1
        if self.failing:
            raise rpcframe.Unavailable(f"{self.name} is failing")
        if request.message == "whoami":
            return echo_pb2.EchoResponse(message=self.name)
        kind, _, rest = request.message.partition(":")
        if kind in ("raise", "py"):
            name, _, text = rest.partition(":")
            raise _error(kind, name, text)
        if kind == "abort":
            code, _, text = rest.partition(":")
            context.abort(grpc.StatusCode[code], text)
        if kind == "sleep":
            time.sleep(float(rest))
        if kind == "block":
            context.add_callback(self.cancelled.set)
            self.started.set()
            self.release.wait(10)
            self.finished.set()
        if kind == "deadline":
            remaining = rpcframe.time_remaining()  # the incoming deadline, as handlers see it
            return echo_pb2.EchoResponse(message="none" if remaining is None else f"{remaining:.3f}")
        return super().Echo(request, context)


class AioScriptedEcho(AioEchoServicer):
    """asyncio servicer driven by the request message."""

    def __init__(self, name: str = "") -> None:
        self.name = name or os.environ.get("RPCFRAME_SERVER_ID", "")
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:  # type: ignore[override]
        self.calls += 1
        if request.message == "whoami":
            return echo_pb2.EchoResponse(message=self.name)
        kind, _, rest = request.message.partition(":")
        if kind in ("raise", "py"):
            name, _, text = rest.partition(":")
            raise _error(kind, name, text)
        if kind == "abort":
            code, _, text = rest.partition(":")
            await context.abort(grpc.StatusCode[code], text)
        if kind == "sleep":
            await asyncio.sleep(float(rest))
        if kind == "block":
            self.started.set()
            try:
                await asyncio.wait_for(self.release.wait(), 10)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            self.finished.set()
        if kind == "deadline":
            remaining = rpcframe.time_remaining()  # the incoming deadline, as handlers see it
            return echo_pb2.EchoResponse(message="none" if remaining is None else f"{remaining:.3f}")
        return await super().Echo(request, context)


def tagged() -> ScriptedEcho:
    """Factory for `rpcframe serve`: a sync servicer named by $RPCFRAME_SERVER_ID."""
    return ScriptedEcho()


def aio_tagged() -> AioScriptedEcho:
    """Factory for `rpcframe serve`: an asyncio servicer named by $RPCFRAME_SERVER_ID."""
    return AioScriptedEcho()


class Backend:
    """An in-process thread-pool rpcframe server on 127.0.0.1, port 0.

    A name serves a :class:`ScriptedEcho` of that name ("whoami" answers it);
    any other servicer object is served as it is.
    """

    def __init__(self, servicer: object) -> None:
        self.servicer: Any = ScriptedEcho(servicer) if isinstance(servicer, str) else servicer
        self.server = rpcframe.Server(rpcframe.ServerConfig(grace_period=1))
        self.server.add(self.servicer)
        self.address = f"127.0.0.1:{self.server.bind('127.0.0.1:0')}"
        self.server.start()

    def stop(self) -> None:
        """Release blocked handlers and stop the server at once."""
        release = getattr(self.servicer, "release", None)
        if release is not None:
            release.set()
        self.server.stop(0)


class WorkerProbe(BenchServicer):
    """BenchService of one server process: answers carry its PID as ``server_id``; Record executions are logged.

    A Record key is ``ID`` or ``ID@MS`` (the handler then takes MS ms); each
    execution appends ``ID PID`` to the file ``$RPCFRAME_RECORD_LOG`` names
    (one ``O_APPEND`` write per line, so several processes share the file).
    """

    def __init__(self) -> None:
        super().__init__(server_id=str(os.getpid()))

    def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:
        """Log, wait as the key says, then record as BenchServicer does."""
        time.sleep(_record_delay(request.key))
        return super().Record(request, context)


class AioWorkerProbe(AioBenchServicer):
    """asyncio :class:`WorkerProbe`."""

    def __init__(self) -> None:
        super().__init__(server_id=str(os.getpid()))

    async def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:  # type: ignore[override]
        """Log, wait as the key says, then record as AioBenchServicer does."""
        await asyncio.sleep(_record_delay(request.key))
        return await super().Record(request, context)


def _record_delay(key: str) -> float:
    """Log the execution of Record ``key``; the seconds it asks the handler to take."""
    request_id, _, ms = key.partition("@")
    path = os.environ.get("RPCFRAME_RECORD_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{request_id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
    return int(ms) / 1000 if ms else 0.0


def _check_poison() -> None:
    """Fail while the file ``$RPCFRAME_PROBE_POISON`` names exists (a deploy whose code does not start)."""
    poison = os.environ.get("RPCFRAME_PROBE_POISON")
    if poison and os.path.exists(poison):
        raise RuntimeError("poisoned: this worker cannot start")


def worker_probe() -> WorkerProbe:
    """Factory for `rpcframe serve --workers N`: called in each worker, after the fork."""
    _check_poison()
    return WorkerProbe()


def aio_worker_probe() -> AioWorkerProbe:
    """asyncio factory for `rpcframe serve --workers N`."""
    _check_poison()
    return AioWorkerProbe()
