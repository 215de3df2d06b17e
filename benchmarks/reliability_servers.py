"""BenchService backends for the reliability suite that log every execution by request id.

``RELIABILITY_LOG`` names a file; each ``Unary``, ``ServerStream`` and
``Record`` call whose request carries an id (``payload`` or ``key``) appends
``KIND ID WALL_TIME`` to it when its handler starts. A ``Record`` whose key
contains ``.refused`` then fails with ``ConnectionRefusedError``, as a relay
whose downstream refused would, after its side effect: a client that took
that for "never sent" would run it twice. Writes go straight to
the file (``O_APPEND``, no Python buffer), so a backend killed with SIGKILL
or stopped with SIGSTOP loses nothing it executed. Without the variable
nothing is logged.

rpcframe's server: ``rpcframe serve benchmarks.reliability_servers:servicer``
(or ``:aio_servicer``). grpcio's alone: ``python -m
benchmarks.reliability_servers --raw --sync|--aio ...`` (the arguments of
``python -m examples.bench_server``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from examples import bench_server
from generated.rpcframe.bench.v1 import bench_pb2

_fd: int | None = None
REFUSED = ".refused"


def _log(kind: str, request_id: bytes | str) -> None:
    global _fd
    if not request_id:
        return
    if _fd is None:
        path = os.environ.get("RELIABILITY_LOG")
        if not path:
            return
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    text = request_id.decode() if isinstance(request_id, bytes) else request_id
    os.write(_fd, f"{kind} {text} {time.time():.6f}\n".encode())


class LoggedBench(bench_server.BenchServicer):
    """The thread-pool BenchService, logging executions."""

    def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        """Log, then answer as BenchServicer does."""
        _log("unary", request.payload)
        return super().Unary(request, context)

    def ServerStream(self, request: bench_pb2.BenchRequest, context: Any) -> Iterator[bench_pb2.BenchResponse]:
        """Log, then stream as BenchServicer does."""
        _log("stream", request.payload)
        yield from super().ServerStream(request, context)

    def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:
        """Log, then record as BenchServicer does."""
        _log("record", request.key)
        response = super().Record(request, context)
        if REFUSED in request.key:
            raise ConnectionRefusedError("failed to connect to all addresses (a downstream, after the side effect)")
        return response


class LoggedAioBench(bench_server.AioBenchServicer):
    """The asyncio BenchService, logging executions."""

    async def Unary(self, request: bench_pb2.BenchRequest, context: Any) -> bench_pb2.BenchResponse:
        """Log, then answer as AioBenchServicer does."""
        _log("unary", request.payload)
        return await super().Unary(request, context)

    async def ServerStream(
        self, request: bench_pb2.BenchRequest, context: Any
    ) -> AsyncIterator[bench_pb2.BenchResponse]:
        """Log, then stream as AioBenchServicer does."""
        _log("stream", request.payload)
        async for response in super().ServerStream(request, context):
            yield response

    async def Record(self, request: bench_pb2.RecordRequest, context: Any) -> bench_pb2.RecordResponse:
        """Log, then record as AioBenchServicer does."""
        _log("record", request.key)
        response = await super().Record(request, context)
        if REFUSED in request.key:
            raise ConnectionRefusedError("failed to connect to all addresses (a downstream, after the side effect)")
        return response


servicer = LoggedBench()
aio_servicer = LoggedAioBench()


def main(argv: list[str] | None = None) -> int:
    """examples.bench_server's runner (raw grpcio or rpcframe) with the logging servicers."""
    # The runner builds its servicers from these module names: point them at ours.
    bench_server.BenchServicer = LoggedBench  # type: ignore[misc]
    bench_server.AioBenchServicer = LoggedAioBench  # type: ignore[misc]
    return bench_server.main(argv)


if __name__ == "__main__":
    sys.exit(main())
