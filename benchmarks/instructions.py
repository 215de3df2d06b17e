"""Per-call cost in CPU instructions (valgrind callgrind): rpcframe vs raw grpcio, one call in flight.

::

    python -m benchmarks.instructions [--calls 1000] [--only aio-client,sync-server]

Timings on a shared 2-core machine swing by tens of percent; instruction
counts do not. Each scenario runs the measured side (client or server) under
``valgrind --tool=callgrind`` twice, with ``--warm`` calls and with ``--warm
+ --calls`` calls, and reports ``(I2 - I1) / calls``: the instructions one
more call costs, every thread of the process included (grpc's C core, the
event loop, rpcframe's Python), start-up and shutdown cancelled out. The
other side is a raw grpcio peer in its own process, not measured. Unary
echo of a 64-byte message, one call at a time, both stacks on the default
asyncio loop (uvloop is not what is compared here).

Background threads poll on timers, so a count still moves with wall time a
little: repeated runs agree within about 1 %. Anything that depends on
time follows valgrind's clock, under which a call lasts some 40 times
longer: timers fire more often per call (the asyncio server's 50 ms
event-loop lag probe: ~10k instructions per call here), and admission
control, which skips reading a call's deadline for methods whose median
latency is under 1 ms, reads it for the echo here. The "no-overload" rows
therefore overstate what overload protection costs natively. Results go to
``benchmarks/results/instructions.md``. Needs valgrind (Debian package
``valgrind``); without it the script says so and exits 0.

Scenarios: ``aio-client`` (rpcframe.aio channel vs grpc.aio channel),
``sync-client`` (rpcframe channel vs grpc channel), ``sync-server``
(rpcframe.Server vs grpc.server with 16 threads), ``aio-server``
(rpcframe.aio.Server vs grpc.aio.server); rpcframe with default settings,
and each rpcframe row also with the feature named in ``VARIANTS`` off.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCENARIOS = ("aio-client", "sync-client", "sync-server", "aio-server")
#: rpcframe variants measured beside the defaults: name -> what it turns off.
VARIANTS = {
    "aio-client": ("rpcframe", "rpcframe:no-throttle", "rpcframe:no-health"),
    "sync-client": ("rpcframe", "rpcframe:no-throttle", "rpcframe:no-health"),
    "sync-server": ("raw:streamed", "rpcframe", "rpcframe:no-overload"),
    "aio-server": ("raw:streamed", "rpcframe", "rpcframe:no-overload"),
}
#: What a variant's row is called in the table.
LABELS = {
    "raw:streamed": "raw grpcio, method registered request-streaming",
    "rpcframe:no-throttle": "rpcframe, no-throttle",
    "rpcframe:no-health": "rpcframe, no-health",
    "rpcframe:no-overload": "rpcframe, no-overload",
}
_COLLECTED = re.compile(r"Collected : (\d+)")


# -- the measured processes ------------------------------------------------------------------


def _echo() -> tuple[Any, Any]:
    from generated.rpcframe.echo.v1 import echo_pb2, echo_pb2_grpc

    return echo_pb2, echo_pb2_grpc


def _client_config(stack: str) -> Any:
    import rpcframe

    off = stack.partition(":")[2]
    if off == "no-throttle":
        return rpcframe.ChannelConfig(throttle=None)
    if off == "no-health":
        return rpcframe.ChannelConfig(health_check=False)
    return rpcframe.ChannelConfig()


def run_client(front: str, stack: str, target: str, calls: int) -> None:
    """``calls`` unary calls, one at a time."""
    pb, pb_grpc = _echo()
    request = pb.EchoRequest(message="x" * 64)
    if front == "sync":
        import grpc

        import rpcframe

        if stack == "raw":
            channel: Any = grpc.insecure_channel(target)
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.EchoServiceStub(channel)
        else:
            channel = rpcframe.connect(target, _client_config(stack))
            channel.wait_ready(30)
            stub = channel.stub(pb_grpc.EchoServiceStub)
        for _ in range(calls):
            stub.Echo(request, timeout=30)
        channel.close()
        return

    async def main() -> None:
        import grpc.aio

        import rpcframe.aio

        if stack == "raw":
            channel: Any = grpc.aio.insecure_channel(target)
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = pb_grpc.EchoServiceStub(channel)
        else:
            channel = rpcframe.aio.connect(target, _client_config(stack))
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = channel.stub(pb_grpc.EchoServiceStub)
        for _ in range(calls):
            await stub.Echo(request, timeout=30)
        await channel.close()

    asyncio.run(main())


def run_server(front: str, stack: str, calls: int, port_file: str) -> None:
    """Serve until ``calls`` calls were answered and one more arrived, then exit (the port goes to ``port_file``)."""
    pb, pb_grpc = _echo()
    done = threading.Event()
    served = [0]

    def count() -> None:
        served[0] += 1  # one call at a time: no race
        if served[0] > calls:  # the peer's extra call: all measured ones were answered
            done.set()

    def announce(port: int) -> None:
        _announce(port_file, port)

    overload: dict[str, Any] = {"overload": None} if stack.endswith(":no-overload") else {}
    if stack.endswith(":slow-lag-probe"):  # admission on, the loop-lag probe every 10 s instead of 50 ms
        import rpcframe

        overload = {"overload": rpcframe.OverloadConfig(queue_target=10.0)}
    if front == "sync":
        import grpc

        import rpcframe

        class SyncEcho(pb_grpc.EchoServiceServicer):  # type: ignore[misc]
            def Echo(self, request: Any, context: Any) -> Any:
                count()
                return pb.EchoResponse(message=request.message)

        if stack == "raw:streamed":  # what rpcframe registers: the handler reads its one request itself

            def echo_read(requests: Any, context: Any) -> Any:
                return SyncEcho().Echo(next(requests), context)

            server: Any = grpc.server(ThreadPoolExecutor(max_workers=16))
            _add_streamed(server, echo_read, pb)
            port = server.add_insecure_port("127.0.0.1:0")
        elif stack == "raw":
            server = grpc.server(ThreadPoolExecutor(max_workers=16))
            pb_grpc.add_EchoServiceServicer_to_server(SyncEcho(), server)
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            server = rpcframe.Server(rpcframe.ServerConfig(max_workers=16, **overload))
            server.add(SyncEcho())
            port = server.bind("127.0.0.1:0")
        server.start()
        announce(port)
        done.wait(600)
        os._exit(0)  # the count is what matters; skip the drain

    class AioEcho(pb_grpc.EchoServiceServicer):  # type: ignore[misc]
        async def Echo(self, request: Any, context: Any) -> Any:
            count()
            return pb.EchoResponse(message=request.message)

    async def main() -> None:
        import grpc.aio

        import rpcframe.aio

        if stack == "raw:streamed":
            echo = AioEcho()

            async def echo_read(requests: Any, context: Any) -> Any:
                return await echo.Echo(await context.read(), context)

            server: Any = grpc.aio.server()
            _add_streamed(server, echo_read, pb)
            port = server.add_insecure_port("127.0.0.1:0")
        elif stack == "raw":
            server = grpc.aio.server()
            pb_grpc.add_EchoServiceServicer_to_server(AioEcho(), server)
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            server = rpcframe.aio.Server(rpcframe.ServerConfig(**overload))
            server.add(AioEcho())
            port = server.bind("127.0.0.1:0")
        await server.start()
        announce(port)
        await asyncio.get_running_loop().run_in_executor(None, done.wait, 600)
        os._exit(0)

    asyncio.run(main())


def _add_streamed(server: Any, behaviour: Any, pb: Any) -> None:
    """Register Echo as a request-streaming method whose ``behaviour`` reads the one request."""
    import grpc

    handler = grpc.stream_unary_rpc_method_handler(
        behaviour, request_deserializer=pb.EchoRequest.FromString, response_serializer=pb.EchoResponse.SerializeToString
    )
    service = "rpcframe.echo.v1.EchoService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Echo": handler}),))
    server.add_registered_method_handlers(service, {"Echo": handler})


def run_peer_server(port_file: str) -> None:
    """The unmeasured raw grpc.aio echo server of the client scenarios (until SIGTERM)."""
    pb, pb_grpc = _echo()

    class Echo(pb_grpc.EchoServiceServicer):  # type: ignore[misc]
        async def Echo(self, request: Any, context: Any) -> Any:
            return pb.EchoResponse(message=request.message)

    async def main() -> None:
        import signal

        import grpc.aio

        server = grpc.aio.server()
        pb_grpc.add_EchoServiceServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        _announce(port_file, port)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())


def run_peer_client(port_file: str, calls: int) -> None:
    """The unmeasured raw grpc client of the server scenarios: ``calls`` calls, one at a time."""
    import grpc

    pb, pb_grpc = _echo()
    port = _wait_for_port(port_file, 120)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EchoServiceStub(channel)
        request = pb.EchoRequest(message="x" * 64)
        for _ in range(calls):
            stub.Echo(request, timeout=60)
        # One more, which the server exits in (possibly before answering): every
        # measured call was answered in full, and each run has the same extra.
        try:
            stub.Echo(request, timeout=60)
        except grpc.RpcError:
            pass


def _announce(port_file: str, port: int) -> None:
    Path(port_file + ".tmp").write_text(str(port))
    os.replace(port_file + ".tmp", port_file)  # whole, never half-written


def _wait_for_port(port_file: str, within: float) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        path = Path(port_file)
        if path.exists():
            return int(path.read_text())
        time.sleep(0.05)  # polling another process's file, bounded
    raise RuntimeError(f"no port in {port_file} within {within:g} s")


# -- the orchestration -----------------------------------------------------------------------


def _callgrind(args: Sequence[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
            "benchmarks.instructions", *args]  # fmt: skip


def _collected(output: str) -> int:
    match = _COLLECTED.search(output)
    if match is None:
        raise RuntimeError(f"valgrind reported no count:\n{output[-2000:]}")
    return int(match.group(1))


def measure_client(front: str, stack: str, calls: int, tmp: Path) -> int:
    """Instructions of the client process for ``calls`` calls."""
    port_file = str(tmp / f"peer-{front}-{stack}-{calls}")
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.instructions", "peer-server", port_file], cwd=REPO)
    try:
        port = _wait_for_port(port_file, 60)
        run = subprocess.run(_callgrind(["client", front, stack, f"127.0.0.1:{port}", str(calls)]), cwd=REPO,
                             capture_output=True, text=True, timeout=900)  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"client {front} {stack} failed:\n{run.stderr[-2000:]}")
        return _collected(run.stderr)
    finally:
        peer.terminate()
        peer.wait(30)


def measure_server(front: str, stack: str, calls: int, tmp: Path) -> int:
    """Instructions of the server process for ``calls`` calls."""
    port_file = str(tmp / f"server-{front}-{stack}-{calls}")
    server = subprocess.Popen(_callgrind(["server", front, stack, str(calls), port_file]), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        run_peer_client(port_file, calls)
        _, err = server.communicate(timeout=300)
        return _collected(err)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def per_call(scenario: str, stack: str, warm: int, calls: int, tmp: Path) -> float:
    """Instructions one more call costs: the difference of two runs, per call."""
    front, side = scenario.split("-")
    measure = measure_client if side == "client" else measure_server
    return (measure(front, stack, warm + calls, tmp) - measure(front, stack, warm, tmp)) / calls


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the scenarios and write the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "client":
        run_client(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    if argv and argv[0] == "server":
        run_server(argv[1], argv[2], int(argv[3]), argv[4])
        return 0
    if argv and argv[0] == "peer-server":
        run_peer_server(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="measured calls (default 1000)")
    parser.add_argument("--warm", type=int, default=200, help="calls of the baseline run (default 200)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.only.split(",") if s]
    if any(s not in SCENARIOS for s in scenarios) or args.calls < 1 or args.warm < 1:
        parser.error(f"--only: names of {', '.join(SCENARIOS)}; --calls and --warm >= 1")
    if shutil.which("valgrind") is None:
        print("valgrind not installed (apt-get install valgrind): no instruction counts")
        return 0
    rows: list[tuple[str, str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="rpcframe-instr-") as tmp:
        for scenario in scenarios:
            raw = per_call(scenario, "raw", args.warm, args.calls, Path(tmp))
            rows.append((scenario, "raw grpcio", raw, 1.0))
            print(f"{scenario:12s} raw grpcio {raw:10,.0f} instructions/call", flush=True)
            for stack in VARIANTS[scenario]:
                count = per_call(scenario, stack, args.warm, args.calls, Path(tmp))
                label = LABELS.get(stack, stack)
                rows.append((scenario, label, count, count / raw))
                print(f"{scenario:12s} {label:22s} {count:10,.0f} instructions/call ({count / raw:.3f}x)", flush=True)
    path = _write(rows, args)
    print(f"wrote {path}")
    return 0


def _write(rows: list[tuple[str, str, float, float]], args: argparse.Namespace) -> Path:
    import grpc

    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [
        "# Per-call cost in instructions: rpcframe vs raw grpcio",
        "",
        f"Run {now}: `python -m benchmarks.instructions --calls {args.calls} --warm {args.warm}`; grpcio "
        f"{grpc.__version__}, Python {sys.version.split()[0]}. Instructions one more unary call (64 B echo, one "
        "in flight) costs the measured process, all threads, counted by valgrind callgrind (see the module "
        "docstring); the peer is raw grpcio in another process.",
        "",
        "| scenario | stack | instructions/call | vs raw |",
        "|---|---|---:|---:|",
        *(f"| {s} | {stack} | {count:,.0f} | {ratio:.3f}x |" for s, stack, count, ratio in rows),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "instructions.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
