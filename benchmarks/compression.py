"""Compression: CPU per call and bytes on the wire, gzip/deflate vs none, 64 B / 4 KiB / 1 MiB JSON-like.

Run: ``python -m benchmarks.compression [--quick]``; writes
``benchmarks/results/compression.md``.

Each case is an Echo call whose request and response carry the payload;
compression is set on both sides (``ChannelConfig.compression`` and
``ServerConfig.compression``) with the given threshold. The server runs in a
child process (known by PID), so its CPU is read from ``/proc/PID/stat``
apart from the client's (``time.process_time``). Bytes are counted by a TCP
relay (``tests.integration.test_compression.WireCounter``) on a separate run
of a few calls, so the relay's CPU is in neither count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import rpcframe
import rpcframe.aio
from benchmarks._children import REPO, ChildServers
from examples.echo import AioEchoServicer, EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.integration.test_compression import WireCounter, payload

SIZES = {"64 B": 64, "4 KiB": 4096, "1 MiB": 1024 * 1024}
#: (label, algorithm, threshold): the threshold-0 rows show what the default threshold avoids.
MODES = [("none", None, 1024), ("gzip", "gzip", 1024), ("deflate", "deflate", 1024), ("gzip, threshold 0", "gzip", 0)]
_TICK = os.sysconf("SC_CLK_TCK")
_MAX = 8 * 1024 * 1024
_ROUNDS = 3  # interleaved rounds per size (full run)
_WIRE_CALLS = 10  # calls whose bytes are averaged (HTTP/2 control frames come and go)


@dataclass
class Row:
    """One case's measurements."""

    front: str
    mode: str
    size: str
    calls: int
    client_us: float
    server_us: float
    up: int
    down: int


def _server_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _server_config(algorithm: str | None, threshold: int) -> rpcframe.ServerConfig:
    return rpcframe.ServerConfig(reflection=False, grace_period=0, compression=algorithm,
                                 compression_threshold=threshold, max_receive_message_length=_MAX,
                                 max_send_message_length=_MAX)  # fmt: skip


def _channel_config(algorithm: str | None, threshold: int) -> rpcframe.ChannelConfig:
    return rpcframe.ChannelConfig(health_check=False, compression=algorithm, compression_threshold=threshold,
                                  max_receive_message_length=_MAX, max_send_message_length=_MAX)  # fmt: skip


def serve(front: str, algorithm: str | None, threshold: int) -> None:
    """In the child: one echo server of ``front`` on a free port, announced, until SIGTERM."""
    config = _server_config(algorithm, threshold)
    if front == "aio":
        asyncio.run(_serve_aio(config))
        return
    server = rpcframe.Server(config)
    server.add(EchoServicer())
    port = server.bind("127.0.0.1:0")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print(f"serving on 127.0.0.1:{port}", flush=True)
    server.wait()


async def _serve_aio(config: rpcframe.ServerConfig) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = rpcframe.aio.Server(config)
    server.add(AioEchoServicer())
    port = server.bind("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(0)


def _measure(pid: int, calls: int, run: Callable[[int], None]) -> tuple[float, float]:
    """(client, server) CPU µs per call of ``run(calls)``."""
    client, server = time.process_time(), _server_cpu(pid)
    run(calls)
    return ((time.process_time() - client) / calls * 1e6, (_server_cpu(pid) - server) / calls * 1e6)


def _sync_case(address: str, pid: int, config: rpcframe.ChannelConfig, message: str, calls: int) -> tuple[Any, ...]:
    request = pb.EchoRequest(message=message)

    def run(stub: Any, n: int) -> None:
        for _ in range(n):
            assert len(stub.Echo(request, timeout=30).message) == len(message)

    with rpcframe.connect(address, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        run(stub, max(1, calls // 10))  # warm-up
        cpu = _measure(pid, calls, lambda n: run(stub, n))
    wire = WireCounter(int(address.rsplit(":", 1)[1]))
    try:
        with rpcframe.connect(wire.target, config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            run(stub, 1)
            before = wire.counts()
            run(stub, _WIRE_CALLS)
            after = wire.counts()
    finally:
        wire.close()
    return (*cpu, (after[0] - before[0]) // _WIRE_CALLS, (after[1] - before[1]) // _WIRE_CALLS)


async def _aio_run(address: str, config: rpcframe.ChannelConfig, request: Any, calls: int,
                   between: Callable[[], Any] | None = None) -> Any:  # fmt: skip
    async with rpcframe.aio.connect(address, config) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        await stub.Echo(request, timeout=30)  # warm-up (and connection)
        mark = between() if between is not None else None
        for _ in range(calls):
            assert len((await stub.Echo(request, timeout=30)).message) == len(request.message)
        return mark


_LOOP: asyncio.AbstractEventLoop | None = None


def _in_loop(coro: Any) -> Any:
    """Run ``coro`` in the benchmark's one event loop (grpc.aio keeps state bound to its first loop)."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)


def _aio_case(address: str, pid: int, config: rpcframe.ChannelConfig, message: str, calls: int) -> tuple[Any, ...]:
    request = pb.EchoRequest(message=message)
    _in_loop(_aio_run(address, config, request, max(1, calls // 10)))
    # The run's setup (channel, warm-up call) is measured too: amortized over `calls`.
    cpu = _measure(pid, calls, lambda n: _in_loop(_aio_run(address, config, request, n)))
    wire = WireCounter(int(address.rsplit(":", 1)[1]))
    try:
        before = _in_loop(_aio_run(wire.target, config, request, _WIRE_CALLS, wire.counts))
        after = wire.counts()
    finally:
        wire.close()
    return (*cpu, (after[0] - before[0]) // _WIRE_CALLS, (after[1] - before[1]) // _WIRE_CALLS)


def run_front(front: str, quick: bool) -> list[Row]:
    """Every mode and size on one front, modes interleaved in rounds; each row keeps its least-disturbed round.

    The machine is shared: a single pass per mode lets another process's
    burst land on one mode and not the next. Taking the minimum per call
    over rounds run back to back compares the modes under like conditions.
    """
    children = [ChildServers(["-m", "benchmarks.compression", "--serve", front, algorithm or "", str(threshold)], 1)
                for _, algorithm, threshold in MODES]  # fmt: skip
    case = _aio_case if front == "aio" else _sync_case
    rows = []
    try:
        for size_label, size in SIZES.items():
            message, rounds = payload(size), 1 if quick else _ROUNDS
            calls = (20 if quick else 60) if size > 100_000 else (300 if quick else 1500)
            best: dict[str, Row] = {}
            for _ in range(rounds):
                for (label, algorithm, threshold), child in zip(MODES, children, strict=True):
                    config = _channel_config(algorithm, threshold)
                    client_us, server_us, up, down = case(child.addresses[0], child.proc.pid, config, message, calls)
                    row = Row(front, label, size_label, calls * rounds, client_us, server_us, up, down)
                    if label not in best or client_us + server_us < best[label].client_us + best[label].server_us:
                        best[label] = row
            for row in best.values():
                rows.append(row)
                print(f"{front:4} {row.mode:18} {size_label:6} client {row.client_us:9.1f} µs"
                      f"  server {row.server_us:9.1f} µs  up {row.up:8d} B  down {row.down:8d} B", flush=True)
    finally:
        for child in children:
            child.stop()
    return rows


def report(rows: list[Row], quick: bool) -> str:
    """The markdown table of ``rows``."""
    lines = [
        "# Compression: CPU and bytes per call",
        "",
        f"`python -m benchmarks.compression{' --quick' if quick else ''}` on this machine (2 cores, shared);"
        " Echo of a JSON-like payload, compression set on both channel and server, loopback.",
        "CPU is per call, client and server processes apart (server from /proc; 10 ms ticks, so small"
        " cases need many calls). Bytes are per call on the TCP connection (HTTP/2 framing included),"
        " counted by a relay on a separate run. Modes run interleaved in rounds (3 in a full run);"
        " each row is its least-disturbed round (lowest client + server CPU); `calls` counts all rounds.",
        "",
        "| front | mode | payload | calls | client CPU µs | server CPU µs | bytes up | bytes down |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.front} | {r.mode} | {r.size} | {r.calls} | {r.client_us:.1f} | {r.server_us:.1f} |"
                     f" {r.up} | {r.down} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark (or, with ``--serve``, be its child server)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per case (about a minute)")
    parser.add_argument("--front", choices=["sync", "aio", "both"], default="both")
    parser.add_argument("--serve", nargs=3, metavar=("FRONT", "ALGORITHM", "THRESHOLD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        front, algorithm, threshold = args.serve
        serve(front, algorithm or None, int(threshold))
        return
    fronts = ["sync", "aio"] if args.front == "both" else [args.front]
    rows = [row for front in fronts for row in run_front(front, args.quick)]
    if _LOOP is not None:
        _LOOP.close()
    out = REPO / "benchmarks" / "results" / "compression.md"
    out.write_text(report(rows, args.quick))
    print(f"wrote {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
