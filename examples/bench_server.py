"""BenchService servicers, and a server runner for raw-grpcio vs rpcframe baselines.

Requests shape the work: ``response_size`` bytes per response, ``delay``
before each response, ``count`` responses for ServerStream, and a non-zero
``fail_code`` ends the call with that status. Responses carry ``server_id``
from the environment variable ``RPCFRAME_SERVER_ID`` (default ``bench``).

Serve with rpcframe's command::

    rpcframe serve examples.bench_server:servicer --bind 127.0.0.1:50051       # thread pool
    rpcframe serve examples.bench_server:aio_servicer --bind 127.0.0.1:50051   # asyncio

or side by side with a server written against grpcio alone (``--raw`` never
imports rpcframe)::

    python -m examples.bench_server --raw --aio --bind 127.0.0.1:0
    python -m examples.bench_server --rpcframe --aio --bind 127.0.0.1:0

The runner prints ``serving on HOST:PORT`` once it accepts calls and exits
with code 0 after draining on SIGTERM or SIGINT. ``--ports N`` makes the one
server listen on N ports of the ``--bind`` host (port 0: each a free one;
else N consecutive ports from the given one) and print one ``serving on
HOST:PORT`` line per port, in bind order, all once the server accepts calls;
the first line is the same as without ``--ports``. One process behind N
addresses is how the suite measures client-side balancing against a single
channel without giving the balanced side more server CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection

from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

SERVICE_NAME = bench_pb2.DESCRIPTOR.services_by_name["BenchService"].full_name

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_PAYLOADS: dict[int, bytes] = {}
_MAX_CACHED_PAYLOADS = 64


def _payload(size: int) -> bytes:
    """``size`` zero bytes, cached: building the payload is not the work under test."""
    payload = _PAYLOADS.get(size)
    if payload is None:
        payload = bytes(size)
        if len(_PAYLOADS) < _MAX_CACHED_PAYLOADS:
            _PAYLOADS[size] = payload
    return payload


def _delay(request: bench_pb2.BenchRequest) -> float:
    return request.delay.seconds + request.delay.nanos / 1e9


def _status(fail_code: int) -> grpc.StatusCode:
    return _CODES.get(fail_code, grpc.StatusCode.UNKNOWN)


def _server_id() -> str:
    return os.environ.get("RPCFRAME_SERVER_ID", "bench")


class BenchServicer(bench_pb2_grpc.BenchServiceServicer):
    """Thread-pool BenchService."""

    def __init__(self, server_id: str | None = None) -> None:
        self.server_id = server_id or _server_id()
        self._records: dict[str, int] = {}
        self._lock = threading.Lock()

    def _respond(self, request: bench_pb2.BenchRequest, context: Any, count: int = 0) -> bench_pb2.BenchResponse:
        if request.fail_code:
            context.abort(_status(request.fail_code), f"failing as asked (fail_code={request.fail_code})")
        if request.HasField("delay"):
            time.sleep(_delay(request))
        return bench_pb2.BenchResponse(payload=_payload(request.response_size), server_id=self.server_id, count=count)

    def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        """One response of ``response_size`` bytes (after ``delay``; or fail with ``fail_code``)."""
        return self._respond(request, context)

    def ServerStream(self, request: bench_pb2.BenchRequest, context: Any) -> Iterator[bench_pb2.BenchResponse]:
        """``count`` responses, each after ``delay``, numbered by ``count``."""
        for i in range(request.count):
            yield self._respond(request, context, i)

    def ClientStream(self, request_iterator: Iterator[bench_pb2.BenchRequest], context: Any) -> bench_pb2.BenchResponse:
        """Read every request; answer once with how many there were."""
        n, last = 0, bench_pb2.BenchRequest()
        for request in request_iterator:
            if request.fail_code:
                context.abort(_status(request.fail_code), f"failing as asked (fail_code={request.fail_code})")
            n, last = n + 1, request
        return bench_pb2.BenchResponse(payload=_payload(last.response_size), server_id=self.server_id, count=n)

    def PingPong(
        self, request_iterator: Iterator[bench_pb2.BenchRequest], context: Any
    ) -> Iterator[bench_pb2.BenchResponse]:
        """Answer each request with one response."""
        for i, request in enumerate(request_iterator):
            yield self._respond(request, context, i)

    def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:
        """Count calls per key (a side effect: not idempotent)."""
        with self._lock:
            times = self._records[request.key] = self._records.get(request.key, 0) + 1
        return bench_pb2.RecordResponse(times=times, server_id=self.server_id)


class AioBenchServicer(bench_pb2_grpc.BenchServiceServicer):
    """asyncio BenchService."""

    def __init__(self, server_id: str | None = None) -> None:
        self.server_id = server_id or _server_id()
        self._records: dict[str, int] = {}

    async def _respond(self, request: bench_pb2.BenchRequest, context: Any, count: int = 0) -> bench_pb2.BenchResponse:
        if request.fail_code:
            await context.abort(_status(request.fail_code), f"failing as asked (fail_code={request.fail_code})")
        if request.HasField("delay"):
            await asyncio.sleep(_delay(request))
        return bench_pb2.BenchResponse(payload=_payload(request.response_size), server_id=self.server_id, count=count)

    async def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:  # type: ignore[override]
        """One response of ``response_size`` bytes (after ``delay``; or fail with ``fail_code``)."""
        return await self._respond(request, context)

    async def ServerStream(  # type: ignore[override]
        self, request: bench_pb2.BenchRequest, context: Any
    ) -> AsyncIterator[bench_pb2.BenchResponse]:
        """``count`` responses, each after ``delay``, numbered by ``count``."""
        for i in range(request.count):
            yield await self._respond(request, context, i)

    async def ClientStream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[bench_pb2.BenchRequest], context: Any
    ) -> bench_pb2.BenchResponse:
        """Read every request; answer once with how many there were."""
        n, last = 0, bench_pb2.BenchRequest()
        async for request in request_iterator:
            if request.fail_code:
                await context.abort(_status(request.fail_code), f"failing as asked (fail_code={request.fail_code})")
            n, last = n + 1, request
        return bench_pb2.BenchResponse(payload=_payload(last.response_size), server_id=self.server_id, count=n)

    async def PingPong(  # type: ignore[override]
        self, request_iterator: AsyncIterator[bench_pb2.BenchRequest], context: Any
    ) -> AsyncIterator[bench_pb2.BenchResponse]:
        """Answer each request with one response."""
        i = 0
        async for request in request_iterator:
            yield await self._respond(request, context, i)
            i += 1

    async def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:  # type: ignore[override]
        """Count calls per key (a side effect: not idempotent)."""
        # One event loop thread: no lock needed.
        times = self._records[request.key] = self._records.get(request.key, 0) + 1
        return bench_pb2.RecordResponse(times=times, server_id=self.server_id)


servicer = BenchServicer()
aio_servicer = AioBenchServicer()


# -- runners -------------------------------------------------------------------


def _ready(bind: str, ports: list[int]) -> None:
    host = bind.rpartition(":")[0]
    print("".join(f"serving on {host}:{port}\n" for port in ports), end="", flush=True)


def _binds(bind: str, count: int) -> list[str]:
    """``count`` addresses on ``bind``'s host: all port 0, or consecutive ports from ``bind``'s."""
    host, _, port_text = bind.rpartition(":")
    port = int(port_text)
    return [f"{host}:{port + i if port else 0}" for i in range(count)]


def _wait_for_signal() -> None:
    """Block the main thread until SIGTERM or SIGINT."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):  # a timed wait stays interruptible by signals
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


async def _wait_for_signal_aio() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    try:
        await stop.wait()
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)


def _run_loop(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def serve_raw_sync(bind: str, workers: int, grace: float, ports: int = 1) -> None:
    """grpcio's thread-pool server, as a grpcio user writes it (plus reflection)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=workers))
    bench_pb2_grpc.add_BenchServiceServicer_to_server(BenchServicer(), server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = [server.add_insecure_port(b) for b in _binds(bind, ports)]
    server.start()
    _ready(bind, bound)
    _wait_for_signal()
    server.stop(grace).wait()


async def serve_raw_aio(bind: str, grace: float, ports: int = 1) -> None:
    """grpc.aio's server, as a grpcio user writes it (plus reflection)."""
    server = grpc.aio.server()
    bench_pb2_grpc.add_BenchServiceServicer_to_server(AioBenchServicer(), server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = [server.add_insecure_port(b) for b in _binds(bind, ports)]
    await server.start()
    _ready(bind, bound)
    await _wait_for_signal_aio()
    await server.stop(grace)


def serve_rpcframe_sync(bind: str, workers: int, grace: float, ports: int = 1) -> None:
    """rpcframe's thread-pool server (health and reflection included)."""
    import rpcframe

    # The same pool as the raw server and, like it, no tight per-connection
    # stream cap: the benchmark's callers and the client's health Watch share
    # one connection, and the side-by-side compares per-call cost (the cap is
    # a defence, measured by make reliability).
    config = rpcframe.ServerConfig(max_workers=workers, max_concurrent_streams=1000, grace_period=grace)
    server = rpcframe.Server(config)
    server.add(BenchServicer())
    bound = [server.bind(b) for b in _binds(bind, ports)]
    server.run(on_ready=lambda: _ready(bind, bound))


async def serve_rpcframe_aio(bind: str, grace: float, ports: int = 1) -> None:
    """rpcframe's asyncio server (health and reflection included)."""
    import rpcframe
    import rpcframe.aio

    server = rpcframe.aio.Server(rpcframe.ServerConfig(grace_period=grace))
    server.add(AioBenchServicer())
    bound = [server.bind(b) for b in _binds(bind, ports)]
    await server.run(on_ready=lambda: _ready(bind, bound))


def main(argv: list[str] | None = None) -> int:
    """Run one BenchService server until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m examples.bench_server", description=__doc__.split("\n")[0])
    stack = parser.add_mutually_exclusive_group()
    stack.add_argument("--raw", dest="stack", action="store_const", const="raw", help="grpcio alone")
    stack.add_argument("--rpcframe", dest="stack", action="store_const", const="rpcframe", help="rpcframe (default)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--aio", dest="aio", action="store_true", default=True, help="asyncio server (default)")
    mode.add_argument("--sync", dest="aio", action="store_false", help="thread-pool server")
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--uvloop", dest="uvloop", action="store_true", default=None,
                      help="asyncio server on uvloop (default with --rpcframe)")  # fmt: skip
    loop.add_argument("--no-uvloop", dest="uvloop", action="store_false",
                      help="asyncio server on the default asyncio loop (default with --raw)")  # fmt: skip
    parser.add_argument("--bind", default="127.0.0.1:50051", metavar="HOST:PORT", help="port 0 picks a free one")
    parser.add_argument("--workers", type=int, default=16, help="thread-pool size of sync servers (default 16)")
    parser.add_argument("--grace", type=float, default=2.0, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--ports", type=int, default=1, metavar="N",
                        help="listen on N ports of the --bind host, one 'serving on' line each")  # fmt: skip
    args = parser.parse_args(argv)
    if args.ports < 1:
        parser.error("--ports must be >= 1")
    stack_name = args.stack or "rpcframe"
    # Each stack's own default loop: rpcframe runs on uvloop, grpc.aio on asyncio.
    use_uvloop = args.uvloop if args.uvloop is not None else stack_name == "rpcframe"
    if stack_name == "raw":
        if args.aio:
            _run_loop(serve_raw_aio(args.bind, args.grace, args.ports), use_uvloop)
        else:
            serve_raw_sync(args.bind, args.workers, args.grace, args.ports)
    elif args.aio:
        _run_loop(serve_rpcframe_aio(args.bind, args.grace, args.ports), use_uvloop)
    else:
        serve_rpcframe_sync(args.bind, args.workers, args.grace, args.ports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
