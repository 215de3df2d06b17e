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

Background threads and timers work by the clock, not by the calls, and
under valgrind a call lasts some 40 times longer, so their share per call
is some 40 times what it is natively. A third run therefore makes the
``--warm`` calls and then idles for as long as the measured calls took:
what it costs beyond the short run is the **background**, and "calls
alone" (all minus background) is what the calls themselves cost; the
ratios are given both ways. Repeated runs agree within about 1 % on an
idle machine and about 3 % while other work runs beside it (background
readings within a few thousand per call). Admission control,
which skips reading a call's deadline for methods whose median latency is
under 1 ms, reads it for the echo here (valgrind's clock again). Results
go to ``benchmarks/results/instructions.md``. Needs valgrind (Debian
package ``valgrind``); without it the script says so and exits 0.

Scenarios: ``aio-client`` (rpcframe.aio channel vs grpc.aio channel),
``sync-client`` (rpcframe channel vs grpc channel), ``sync-server``
(rpcframe.Server vs grpc.server with 16 threads), ``aio-server``
(rpcframe.aio.Server vs grpc.aio.server), ``sync-relay`` and ``aio-relay``
(a middle hop: the server answers each call by calling a raw grpc.aio peer
through the same stack's client, so the call inside a handler is measured
with everything around it), ``uvloop-client`` and ``uvloop-server``
(``aio-client``, ``aio-server`` with both stacks on uvloop), ``balanced-client``
(an asyncio client balancing over three raw peers, as rpcframe's defaults do
it, against a raw grpc.aio channel to one of them); rpcframe with default settings,
and each rpcframe row also with the feature named in ``VARIANTS`` off;
the server scenarios also measure raw grpcio with the method registered
request-streaming, as rpcframe registers unary methods.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCENARIOS = (
    "aio-client", "sync-client", "sync-server", "aio-server", "sync-relay", "aio-relay", "uvloop-client",
    "uvloop-server", "balanced-client",
)  # fmt: skip
#: rpcframe variants measured beside the defaults: name -> what it turns off.
VARIANTS = {
    "aio-client": ("rpcframe", "rpcframe:no-throttle", "rpcframe:no-health"),
    "sync-client": ("rpcframe", "rpcframe:no-throttle", "rpcframe:no-health"),
    "sync-server": ("raw:streamed", "rpcframe", "rpcframe:no-overload"),
    "aio-server": ("raw:streamed", "rpcframe", "rpcframe:no-overload"),
    "uvloop-client": ("rpcframe",),
    "uvloop-server": ("rpcframe", "rpcframe:no-overload"),
    "balanced-client": ("rpcframe", "rpcframe:no-health"),
    "sync-relay": ("rpcframe",),
    "aio-relay": ("rpcframe",),
}
#: What a variant's row is called in the table.
LABELS = {
    "raw": "raw grpcio",
    "raw:streamed": "raw grpcio, method registered request-streaming",
    "rpcframe:no-throttle": "rpcframe, no-throttle",
    "rpcframe:no-health": "rpcframe, no-health",
    "rpcframe:no-overload": "rpcframe, no-overload",
}
_COLLECTED = re.compile(r"Collected : (\d+)")
_ELAPSED = re.compile(r"elapsed=([\d.]+)")
_RUNS = itertools.count()  # each run its own port file


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


def run_client(front: str, stack: str, target: str, calls: int, mark: int = 0, idle: float = 0.0) -> None:
    """``calls`` unary calls, one at a time, then ``idle`` seconds without any.

    Prints ``elapsed=S``: the seconds the calls after the first ``mark`` took.
    """
    pb, pb_grpc = _echo()
    request = pb.EchoRequest(message="x" * 64)
    clock = _Clock(mark)
    if front == "balanced":  # asyncio; rpcframe balances over every address, raw grpc calls the first
        front = "aio"
        if stack == "raw":
            target = target.split(",")[0]
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
        for call in range(calls):
            clock.tick(call)
            stub.Echo(request, timeout=30)
        print(f"elapsed={clock.done():.6f}", flush=True)  # for measure_client
        time.sleep(idle)  # deliberate: a background run idles as long as the calls took (see per_call)
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
        for call in range(calls):
            clock.tick(call)
            await stub.Echo(request, timeout=30)
        print(f"elapsed={clock.done():.6f}", flush=True)
        await asyncio.sleep(idle)  # the loop runs its background work meanwhile (see per_call)
        await channel.close()

    if front == "uvloop":  # both stacks on uvloop: rpcframe's default loop against grpc.aio on the same
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def run_server(
    front: str, stack: str, calls: int, port_file: str, downstream: str = "", *,
    on_call: Callable[[int], None] | None = None, at_exit: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """Serve until ``calls`` calls were answered and one more arrived, then exit (the port goes to ``port_file``).

    With ``downstream``, each call is answered by calling Echo there (a relay,
    through the same stack's client: the measured process is a middle hop).
    ``on_call(n)`` runs as the n-th call's handler starts, ``at_exit()`` before
    the process exits (for :mod:`benchmarks.bytecodes`).
    """
    pb, pb_grpc = _echo()
    done = threading.Event()
    served = [0]

    def count() -> None:
        served[0] += 1  # one call at a time: no race
        if on_call is not None:
            on_call(served[0])
        if served[0] > calls:  # the peer's extra call: all measured ones were answered
            done.set()

    def announce(port: int) -> None:
        _announce(port_file, port)

    overload: dict[str, Any] = {"overload": None} if stack.endswith(":no-overload") else {}
    if stack.endswith(":slow-lag-probe"):  # admission on, the asyncio loop-lag probe every 10 s instead of 50 ms
        import rpcframe

        overload = {"overload": rpcframe.OverloadConfig(queue_target=10.0)}
    if front == "sync":
        import grpc

        import rpcframe

        relay: Any = None
        if downstream:
            if stack == "raw":
                relay = pb_grpc.EchoServiceStub(grpc.insecure_channel(downstream))
            else:
                relay = rpcframe.connect(downstream).stub(pb_grpc.EchoServiceStub)

        class SyncEcho(pb_grpc.EchoServiceServicer):  # type: ignore[misc]
            def Echo(self, request: Any, context: Any) -> Any:
                count()
                if relay is not None:
                    return relay.Echo(request, timeout=60)
                return pb.EchoResponse(message=request.message)

        if stack == "raw:streamed":  # what rpcframe registers: the handler reads its one request itself

            echo = SyncEcho()  # once, as the asyncio variant: the raw row pays for no allocation of ours

            def echo_read(requests: Any, context: Any) -> Any:
                return echo.Echo(next(requests), context)

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
        if at_exit is not None:
            at_exit()
        os._exit(0)  # the count is what matters; skip the drain

    relays: list[Any] = []  # the downstream stub, made on the server's loop

    class AioEcho(pb_grpc.EchoServiceServicer):  # type: ignore[misc]
        async def Echo(self, request: Any, context: Any) -> Any:
            count()
            if relays:
                return await relays[0].Echo(request, timeout=60)
            return pb.EchoResponse(message=request.message)

    async def main() -> None:
        import grpc.aio

        import rpcframe.aio

        if downstream:
            channel: Any = grpc.aio.insecure_channel(downstream) if stack == "raw" else rpcframe.aio.connect(downstream)
            relays.append(pb_grpc.EchoServiceStub(channel))

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
        if at_exit is not None:
            at_exit()
        os._exit(0)

    if front == "uvloop":  # both stacks on uvloop, as the client scenario
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _add_streamed(server: Any, behaviour: Any, pb: Any) -> None:
    """Register Echo as a request-streaming method whose ``behaviour`` reads the one request."""
    import grpc

    handler = grpc.stream_unary_rpc_method_handler(
        behaviour, request_deserializer=pb.EchoRequest.FromString, response_serializer=pb.EchoResponse.SerializeToString
    )
    service = pb.DESCRIPTOR.services_by_name["EchoService"].full_name
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


def run_peer_client(port_file: str, calls: int, mark: int = 0, idle: float = 0.0) -> float:
    """The unmeasured raw grpc client of the server scenarios: ``calls`` calls, one at a time.

    Then ``idle`` seconds without calls before the last one; returns the
    seconds the calls after the first ``mark`` took.
    """
    clock = _Clock(mark)
    import grpc

    pb, pb_grpc = _echo()
    port = _wait_for_port(port_file, 120)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EchoServiceStub(channel)
        request = pb.EchoRequest(message="x" * 64)
        for call in range(calls):
            clock.tick(call)
            _answered(stub, request, grpc)
        elapsed = clock.done()
        time.sleep(idle)  # deliberate: the server idles as long as the calls took (see per_call)
        # One more, which the server exits in (possibly before answering): every
        # measured call was answered in full, and each run has the same extra.
        try:
            stub.Echo(request, timeout=60)
        except grpc.RpcError:
            pass
    return elapsed


def _answered(stub: Any, request: Any, grpc: Any) -> None:
    """One call, sent again while the server refuses it for load.

    Under valgrind a shared machine can lag an asyncio server's loop past
    its queue target, and its default admission control then refuses calls
    unrun; the measurement wants every call answered, at the price of a
    rare refused attempt counted in.
    """
    for _ in range(100):  # bounded: a server that keeps refusing fails the run
        try:
            stub.Echo(request, timeout=60)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
    raise RuntimeError("the server refused the same call 100 times")


class _Clock:
    """How long the calls after the first ``mark`` took."""

    def __init__(self, mark: int) -> None:
        self._mark, self._started = mark, time.monotonic()

    def tick(self, call: int) -> None:
        if call == self._mark:
            self._started = time.monotonic()

    def done(self) -> float:
        return time.monotonic() - self._started


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


def measure_client(
    front: str, stack: str, calls: int, tmp: Path, mark: int = 0, idle: float = 0.0
) -> tuple[int, float]:
    """Instructions of the client process for ``calls`` calls (and ``idle`` seconds), and the seconds after ``mark``."""
    with contextlib.ExitStack() as peers:
        servers = 3 if front == "balanced" else 1
        names = [f"peer-{front}-{stack}-{calls}-{n}" for n in range(servers)]
        target = ",".join(peers.enter_context(_peer_server(tmp, name)) for name in names)
        args = ["client", front, stack, target, str(calls), str(mark), str(idle)]
        run = subprocess.run(_callgrind(args), cwd=REPO, capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            raise RuntimeError(f"client {front} {stack} failed:\n{run.stderr[-2000:]}")
        return _collected(run.stderr), float(_ELAPSED.findall(run.stdout)[-1])


@contextlib.contextmanager
def _peer_server(tmp: Path, name: str) -> Iterator[str]:
    """A raw grpc.aio echo server in its own process (not measured) for as long as the block runs: its target."""
    port_file = str(tmp / f"{name}-{next(_RUNS)}")
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.instructions", "peer-server", port_file], cwd=REPO)
    try:
        yield f"127.0.0.1:{_wait_for_port(port_file, 60)}"
    finally:
        peer.terminate()
        peer.wait(30)


def measure_server(
    front: str, stack: str, calls: int, tmp: Path, mark: int = 0, idle: float = 0.0, downstream: str = ""
) -> tuple[int, float]:
    """Instructions of the server process for ``calls`` calls (and ``idle`` seconds), and the seconds after ``mark``."""
    port_file = str(tmp / f"server-{front}-{stack}-{calls}-{next(_RUNS)}")
    args = ["server", front, stack, str(calls), port_file, *([downstream] if downstream else [])]
    server = subprocess.Popen(_callgrind(args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        elapsed = run_peer_client(port_file, calls, mark, idle)
        _, err = server.communicate(timeout=300)
        return _collected(err), elapsed
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def measure_relay(
    front: str, stack: str, calls: int, tmp: Path, mark: int = 0, idle: float = 0.0
) -> tuple[int, float]:
    """:func:`measure_server` for a server that answers each call by calling a raw grpc peer (a middle hop)."""
    with _peer_server(tmp, f"downstream-{front}-{stack}-{calls}") as downstream:
        return measure_server(front, stack, calls, tmp, mark, idle, downstream)


def per_call(scenario: str, stack: str, warm: int, calls: int, tmp: Path) -> tuple[float, float]:
    """Instructions one more call costs (the difference of two runs, per call), and of them the background's.

    The background is what a third run, idle for as long as the calls
    took, spends beyond the short one: timers and pollers, whose cost
    follows the clock (and valgrind's slow clock), not the calls.
    """
    front, side = scenario.split("-")
    measure = {"client": measure_client, "server": measure_server, "relay": measure_relay}[side]
    long, elapsed = measure(front, stack, warm + calls, tmp, mark=warm)
    short, _ = measure(front, stack, warm, tmp)
    idle, _ = measure(front, stack, warm, tmp, idle=elapsed)
    return (long - short) / calls, (idle - short) / calls


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the scenarios and write the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "client":
        run_client(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), float(argv[6]))
        return 0
    if argv and argv[0] == "server":
        run_server(argv[1], argv[2], int(argv[3]), argv[4], *argv[5:6])
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
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rpcframe-instr-") as tmp:
        for scenario in scenarios:
            raw: Row | None = None
            for stack in ("raw", *VARIANTS[scenario]):
                total, background = per_call(scenario, stack, args.warm, args.calls, Path(tmp))
                row = Row(scenario, LABELS.get(stack, stack), total, background, raw)
                raw = raw or row
                rows.append(row)
                print(row.line(), flush=True)
    path = _write(rows, args)
    print(f"wrote {path}")
    return 0


class Row(NamedTuple):
    """One measured stack: instructions per call, of them the background's, and the raw row it is compared with."""

    scenario: str
    stack: str
    total: float
    background: float
    raw: Row | None

    @property
    def calls(self) -> float:
        """Instructions per call without the background's."""
        return self.total - self.background

    def ratios(self) -> tuple[float, float]:
        """(calls, all) relative to raw grpcio's."""
        raw = self.raw or self
        return self.calls / raw.calls, self.total / raw.total

    def line(self) -> str:
        """The row as printed while measuring."""
        net, total = self.ratios()
        return (f"{self.scenario:12s} {self.stack:30s} {self.total:10,.0f} instructions/call, background "
                f"{self.background:8,.0f}, calls {self.calls:10,.0f} ({net:.3f}x; all {total:.3f}x)")


def _write(rows: list[Row], args: argparse.Namespace) -> Path:
    import grpc

    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [
        "# Per-call cost in instructions: rpcframe vs raw grpcio",
        "",
        f"Run {now}: `python -m benchmarks.instructions --calls {args.calls} --warm {args.warm}`; grpcio "
        f"{grpc.__version__}, Python {sys.version.split()[0]}. Instructions one more unary call (64 B echo, one "
        "in flight) costs the measured process, all threads, counted by valgrind callgrind; the peer is raw grpcio "
        "in another process. *Background*: what the same process spends idle for as long as the calls took "
        "(timers, pollers: by the clock, and valgrind's clock is ~40x slow); *calls alone*: the rest. See the "
        "module docstring.",
        "",
        "| scenario | stack | instructions/call | of them background | calls alone | vs raw | vs raw, all |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(f"| {r.scenario} | {r.stack} | {r.total:,.0f} | {r.background:,.0f} | {r.calls:,.0f} | {r.ratios()[0]:.3f}x "
          f"| {r.ratios()[1]:.3f}x |" for r in rows),  # fmt: skip
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "instructions.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
