"""Python bytecodes a served call executes, per function: rpcframe vs raw grpcio.

::

    python -m benchmarks.bytecodes [--calls 1000] [--only sync-server,aio-server]

Where :mod:`benchmarks.instructions` counts everything a call costs (grpc's
C core included) and can only say how much more rpcframe's server spends,
this says where: the server process runs under a trace function that
counts every bytecode each function executes (``f_trace_opcodes``, every
thread), between the start of call ``--warm + 1`` and of call ``--warm +
--calls + 1``, and reports per call the total and the functions whose count
differs from raw grpcio's. The same unary echo as the instructions harness
(64-byte message, one call at a time, a raw grpcio client in its own
process). Counting bytecodes is exact for what runs per call: two runs of
the same code give the same per-call count to the first decimal, except for
work done by the clock (admission control's interval, the asyncio
loop-lag probe), which tracing, some 20 times slower than a normal run,
weighs more, as valgrind does. One bytecode of rpcframe's costs about 80
instructions all told (the per-call instruction gap over the bytecode gap,
asyncio server). Results go to ``benchmarks/results/bytecodes.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import instructions

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("sync-server", "aio-server", "uvloop-server")  # uvloop: both stacks on uvloop
STACKS = ("raw", "raw:streamed", "rpcframe", "rpcframe:no-overload")
_REPO = str(Path(__file__).resolve().parents[1])


def count_server(front: str, stack: str, warm: int, calls: int, port_file: str, out: str) -> None:
    """Serve ``warm + calls`` calls under the bytecode counter; write ``{function: bytecodes}`` of the measured ones."""
    counts: collections.Counter[tuple[str, int, str]] = collections.Counter()
    marks: list[collections.Counter[tuple[str, int, str]]] = []

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return local

    def on_call(served: int) -> None:
        if served in (warm + 1, warm + calls + 1):  # the same point of two calls: the difference is `calls` calls
            marks.append(collections.Counter(counts))

    def at_exit() -> None:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
        first, last = marks
        per_function = {f"{_short(f)}:{line}:{name}": n - first[(f, line, name)] for (f, line, name), n in last.items()}
        Path(out).write_text(json.dumps({k: v for k, v in per_function.items() if v}), encoding="utf-8")

    threading.settrace(trace)
    sys.settrace(trace)
    instructions.run_server(front, stack, warm + calls, port_file, on_call=on_call, at_exit=at_exit)


def _short(filename: str) -> str:
    """A code object's file: relative to site-packages, the standard library or the repository."""
    paths = sysconfig.get_paths()
    for root in (paths["purelib"], paths["platlib"], paths["stdlib"], _REPO):
        if filename.startswith(root + os.sep):
            return os.path.relpath(filename, root)
    return filename


def measure(front: str, stack: str, warm: int, calls: int, tmp: Path) -> dict[str, float]:
    """Bytecodes per call by function for one stack (a server process and the raw peer client)."""
    port_file, out = str(tmp / f"port-{front}-{stack}"), str(tmp / f"counts-{front}-{stack}.json")
    args = [sys.executable, "-m", "benchmarks.bytecodes", "server", front, stack, str(warm), str(calls), port_file, out]
    server = subprocess.Popen(args, cwd=_REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # warm + calls answered, then the one the server exits in (its handler takes the last mark).
        instructions.run_peer_client(port_file, warm + calls)
        _, err = server.communicate(timeout=600)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if server.returncode != 0 or not Path(out).exists():
        raise RuntimeError(f"server {front} {stack} failed:\n{err[-2000:]}")
    counts: dict[str, int] = json.loads(Path(out).read_text(encoding="utf-8"))
    return {name: n / calls for name, n in counts.items()}


def table(front: str, rows: dict[str, dict[str, float]], least: float) -> list[str]:
    """Markdown: totals per stack, then the functions rpcframe's defaults run more or less often than raw."""
    raw = rows["raw"]
    lines = [f"### {front}", "", "| stack | bytecodes per call | vs raw |", "|---|---|---|"]
    total_raw = sum(raw.values())
    for stack, counts in rows.items():
        total = sum(counts.values())
        lines.append(f"| {instructions.LABELS.get(stack, stack)} | {total:,.0f} | {total / total_raw:.3f}× |")
    mine, streamed = rows["rpcframe"], rows["raw:streamed"]
    names = sorted(set(raw) | set(mine) | set(streamed), key=lambda n: (-(mine.get(n, 0) - raw.get(n, 0)), n))
    lines += [
        "",
        "| function | raw | raw, request-streaming | rpcframe | rpcframe − raw |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        a, s, b = raw.get(name, 0.0), streamed.get(name, 0.0), mine.get(name, 0.0)
        if max(abs(b - a), abs(s - a)) >= least:
            lines.append(f"| `{name}` | {a:.1f} | {s:.1f} | {b:.1f} | {b - a:+.1f} |")
    return [*lines, ""]


def main(argv: Sequence[str] | None = None) -> int:
    """Count the scenarios and write the tables."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "server":
        count_server(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5], argv[6])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bytecodes", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="measured calls (default 1000)")
    parser.add_argument("--warm", type=int, default=200, help="calls before the measured ones (default 200)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--least", type=float, default=0.5, help="smallest per-call difference listed (default 0.5)")
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.only.split(",") if s]
    if any(s not in SCENARIOS for s in scenarios) or args.calls < 1 or args.warm < 1:
        parser.error(f"--only: names of {', '.join(SCENARIOS)}; --calls and --warm >= 1")
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [
        "# Python bytecodes per served call, by function",
        "",
        f"`python -m benchmarks.bytecodes --calls {args.calls} --warm {args.warm}`, {started}: what the "
        "server process's Python executes per unary echo call (every thread), rpcframe with default settings "
        "vs raw grpcio; functions listed where the two differ by at least "
        f"{args.least:g} a call. See the module docstring for the method.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="rpcframe-bytecodes-") as tmp:
        for scenario in scenarios:
            front = scenario.split("-")[0]
            rows = {stack: measure(front, stack, args.warm, args.calls, Path(tmp)) for stack in STACKS}
            for stack, counts in rows.items():
                print(f"{scenario} {stack}: {sum(counts.values()):,.1f} bytecodes per call", flush=True)
            lines += table(scenario, rows, args.least)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bytecodes.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
