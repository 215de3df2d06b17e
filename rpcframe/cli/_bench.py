"""``rpcframe bench TARGET --method pkg.Service/Method``: load-test a gRPC method.

Examples::

    rpcframe bench 127.0.0.1:50051 --method rpcframe.bench.v1.BenchService/Unary \\
        --data '{"responseSize": 64}' --payload-size 64 -c 64 -z 10s
    rpcframe bench HOST:PORT --method pkg.Svc/Get --rps 500 -z 30s --json out.json --plot out/run
    rpcframe bench HOST:PORT --method pkg.Svc/Get --client raw --mode sync -c 16 -n 10000 --procs 2

Message types come from generated stubs (``--proto-module``, or the
service's package under ``generated/``) or else from server reflection. The
logic lives in :mod:`rpcframe.bench`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only the light modules at import time: `rpcframe serve` must not need the bench extra.
from ..bench.spec import BenchError, LoadSpec, MethodInfo, parse_duration
from ..config import ChannelConfig
from ._call import headers
from ._common import CliError, add_client_security_flags, client_security

Metadata = tuple[tuple[str, str | bytes], ...]

if TYPE_CHECKING:
    from ..bench.runner import ProgressFn
    from ..security.tls import TLSConfig

__all__ = ["main", "register", "run"]

_DEFAULT_DURATION = 10.0
_OPEN_LOOP_CONCURRENCY = 64


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return seconds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}


def _size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 64, 1KiB)")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def register(sub: Any) -> None:
    """Add the subcommand to the parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "bench", help="load-test a gRPC method (latency percentiles, QPS)",
        description="Load-test one method of any gRPC server and report QPS and HDR latency percentiles.",
    )  # fmt: skip
    p.add_argument("target", metavar="HOST:PORT", help="the server")
    p.add_argument("--method", "--call", required=True, metavar="PKG.SERVICE/METHOD",
                   help="the method to call (--call: ghz's name)")  # fmt: skip
    p.add_argument("-d", "--data", default=None, metavar="JSON|@FILE", help="the request as protobuf JSON (default {})")
    p.add_argument("--payload-size", type=_size, default=None, metavar="BYTES",
                   help="fill the request's 'bytes payload' field with this many bytes")  # fmt: skip
    p.add_argument("--proto-module", default=None, metavar="MODULE",
                   help="generated *_pb2 module defining the service (default: look under generated/, "
                        "then ask the server's reflection)")  # fmt: skip
    p.add_argument("--reflection", action="store_true", help="take message types only from server reflection")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'KEY: VALUE'",
                   help="metadata sent with every call and reflection request (repeatable; "
                        "values of -bin keys are base64)")  # fmt: skip
    load = p.add_argument_group("load")
    load.add_argument("-c", "--concurrency", type=_positive_int, default=None,
                      help=f"closed loop: concurrent callers (default 1); open loop: most calls in flight "
                           f"(default {_OPEN_LOOP_CONCURRENCY})")  # fmt: skip
    load.add_argument("--rps", type=float, default=None,
                      help="open loop: constant arrival rate in calls/s; latency counts from each call's "
                           "intended send time")  # fmt: skip
    load.add_argument(
        "-z",
        "--duration",
        type=_duration,
        default=None,
        help=f"measured time, e.g. 30s, 2m (default {_DEFAULT_DURATION:g}s unless -n is given)",
    )
    load.add_argument("-n", "--total", type=_positive_int, default=None, help="measured calls")
    load.add_argument("--warmup", type=_duration, default=0.0, help="unrecorded load before measuring (default 0)")
    load.add_argument("--connections", type=_positive_int, default=1, help="channels (TCP connections), default 1")
    load.add_argument("--stream-messages", type=_positive_int, default=1,
                      help="client-streaming methods: requests per call (default 1)")  # fmt: skip
    load.add_argument("--timeout", type=_duration, default=20.0, help="deadline of each call (default 20s)")
    load.add_argument("--connect-timeout", type=_duration, default=5.0,
                      help="wait this long for the server to be ready (default 5s)")  # fmt: skip
    gen = p.add_argument_group("load generator")
    gen.add_argument("--mode", choices=("sync", "aio"), default="aio",
                     help="sync: a thread per caller; aio: coroutines on grpc.aio (default)")  # fmt: skip
    gen.add_argument("--client", choices=("rpcframe", "raw"), default="rpcframe",
                     help="rpcframe channels (default) or raw grpcio channels, to compare the two")  # fmt: skip
    gen.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="aio mode event loop")
    gen.add_argument("--procs", type=_positive_int, default=1,
                     help="load-generator processes sharing the load (default 1)")  # fmt: skip
    out = p.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON (rpcframe.bench.report)")
    out.add_argument("--plot", default=None, metavar="PREFIX", help="write PREFIX-latency.png and PREFIX-timeline.png")
    out.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    add_client_security_flags(p)
    p.set_defaults(run=run)


def _read_data(data: str | None) -> str | None:
    if data is None or not data.startswith("@"):
        return data
    try:
        return Path(data[1:]).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"--data {data}: {exc.strerror or exc}") from None


def _spec(args: argparse.Namespace) -> LoadSpec:
    from ..bench.methods import build_request

    if args.rps is not None and not args.rps > 0:
        raise CliError("--rps must be > 0", 2)
    if args.duration is not None and args.duration <= 0:
        raise CliError("--duration must be > 0", 2)
    duration = args.duration
    if duration is None and args.total is None:
        duration = _DEFAULT_DURATION
    concurrency = args.concurrency or (_OPEN_LOOP_CONCURRENCY if args.rps is not None else 1)
    data = _read_data(args.data)
    metadata = headers(args.header)
    tls, token = client_security(args)
    method = _resolve(args, metadata, tls, token)
    request = build_request(method, data, args.payload_size)
    return LoadSpec(
        target=args.target,
        method=method,
        request=request,
        mode=args.mode,
        client=args.client,
        concurrency=concurrency,
        rps=args.rps,
        duration=duration,
        total=args.total,
        warmup=args.warmup,
        connections=args.connections,
        stream_messages=args.stream_messages,
        call_timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        uvloop=args.loop == "uvloop",
        metadata=metadata,
        tls=tls,
        token=token,
    )


def _resolve(args: argparse.Namespace, metadata: Metadata, tls: TLSConfig | None, token: str | None) -> MethodInfo:
    """The method to load; reflection, when needed, goes over a channel with the run's TLS, token and headers."""
    from ..bench.methods import resolve_method

    reflection = True if args.reflection else None
    if not (metadata or tls or token):
        return resolve_method(args.method, args.target, proto_module=args.proto_module, reflection=reflection,
                              connect_timeout=args.connect_timeout)  # fmt: skip
    from ..client._sync import connect
    from ..errors import ConfigError, RpcError

    try:
        config = ChannelConfig(default_timeout=args.connect_timeout, metadata=metadata, tls=tls, token=token)
        channel = connect(args.target, config)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    try:
        return resolve_method(args.method, args.target, proto_module=args.proto_module, reflection=reflection,
                              channel=channel)  # fmt: skip
    except RpcError as exc:  # what an rpcframe channel raises
        raise BenchError(f"reflection request to {args.target} failed: {exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()


@contextmanager
def _progress_bar(spec: LoadSpec, enabled: bool) -> Iterator[ProgressFn | None]:
    """A rich progress bar fed by the runner's progress callback (only on a terminal)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    by_count = spec.duration is None
    total = float(spec.total) if by_count and spec.total else spec.time_limit
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[calls]} calls"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=True)  # fmt: skip
    task = progress.add_task("connecting", total=total, calls=0, rate="")

    def update(phase: str, calls: int, elapsed: float) -> None:
        done = float(calls) if by_count else min(elapsed, total)
        rate = f"{calls / elapsed:,.0f}/s" if elapsed > 0.1 else ""
        progress.update(task, description=phase, completed=done, calls=calls, rate=rate)

    with progress:
        yield update


#: Seconds between the progress lines printed when stdout is not a terminal (CI logs, pipes).
PROGRESS_LINE_INTERVAL = 5.0


def _progress_lines(interval: float = PROGRESS_LINE_INTERVAL) -> ProgressFn:
    """A progress callback that prints a line to stderr every ``interval`` seconds (logs have no bar)."""
    import time

    last = time.monotonic()

    def update(phase: str, calls: int, elapsed: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= interval:
            last = now
            rate = f", {calls / elapsed:,.0f}/s" if elapsed > 0.1 else ""
            print(f"rpcframe bench: {phase}: {calls} calls in {elapsed:.0f}s{rate}", file=sys.stderr, flush=True)

    return update


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the run, not after it, when an output cannot be written."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is None:
            continue
        # The nearest existing ancestor must be a writable directory (missing ones are made later).
        parent = Path(path).absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise CliError(f"{flag} {path}: {parent} is not a writable directory")


def run(args: argparse.Namespace) -> int:
    """Run the load; print the summary; write JSON and plots when asked."""
    _check_outputs(args)
    try:
        from ..bench.report import print_summary, write_json
        from ..bench.runner import run_bench
    except ImportError as exc:
        raise CliError(f"rpcframe bench needs the bench extra: pip install 'rpcframe[bench]' ({exc})") from None
    if args.total is not None and args.duration is not None:
        print(f"rpcframe: warning: -n {args.total} and -z {args.duration:g}s both given: the run stops at "
              "whichever comes first", file=sys.stderr)  # fmt: skip
    try:
        spec = _spec(args)
        terminal = sys.stdout.isatty()
        with _progress_bar(spec, terminal and not args.no_progress) as progress:
            if not terminal and not args.no_progress:
                progress = _progress_lines()
            result = run_bench(spec, procs=args.procs, progress=progress)
    except BenchError as exc:
        # One line, whatever the underlying library put in its message.
        raise CliError(" ".join(str(exc).split())) from None
    print_summary(result)
    written: list[Path] = []
    try:
        if args.json:
            written.append(write_json(result, args.json))
        if args.plot:
            from ..bench.plot import write_plots

            written.extend(write_plots(result, args.plot))
    except ImportError as exc:
        raise CliError(f"--plot needs matplotlib: pip install 'rpcframe[bench]' ({exc})") from None
    except OSError as exc:
        raise CliError(f"cannot write output: {exc}") from None
    for path in written:
        print(f"wrote {path}")
    if result.calls == 0 or result.merged.ok == 0:
        raise CliError(f"every call failed ({result.calls} calls, none OK)" if result.calls else "no call was made")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rpcframe bench ARGS`` on its own (same error reporting as ``rpcframe``)."""
    parser = argparse.ArgumentParser(prog="rpcframe")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"rpcframe: error: {exc}" if exc.prefix else str(exc), file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
