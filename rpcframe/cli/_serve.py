"""``rpcframe serve MODULE:OBJECT --bind HOST:PORT [--workers N|auto] [--tls-cert FILE --tls-key FILE ...]``.

With ``--workers`` N > 1 this process is a supervisor of N server processes
(:mod:`rpcframe.server._workers`): it checks the flags and reserves the
ports, and each worker loads the target and builds its server after the fork.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from ..accesslog import AccessLog
from ..config import RateLimit, ServerConfig
from ..errors import ConfigError
from ..server._workers import (
    Supervisor,
    WorkerError,
    announced,
    cpu_count,
    is_async,
    serve_here,
    servicers_of,
    stop_within,
    with_reuseport,
)
from ._common import (
    CliError,
    add_server_security_flags,
    bind_error,
    load_object,
    server_auth,
    server_tls,
    split_host_port,
)


def register(sub: Any) -> None:
    """Add the subcommand to the parser."""
    p: argparse.ArgumentParser = sub.add_parser("serve", help="serve a servicer (or a factory of servicers)")
    p.add_argument("target", metavar="MODULE:OBJECT", help="servicer instance, class, or factory returning servicers")
    p.add_argument(
        "--bind",
        action="append",
        default=None,
        metavar="HOST:PORT",
        help="address to listen on (repeatable; default 127.0.0.1:50051; port 0 picks a free one)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--aio", dest="aio", action="store_true", default=None, help="force the asyncio server")
    mode.add_argument("--sync", dest="aio", action="store_false", help="force the thread-pool server")
    p.add_argument("--no-uvloop", action="store_true", help="asyncio server: use the default asyncio loop")
    defaults = ServerConfig()
    p.add_argument("--grace", type=float, default=defaults.grace_period,
                   help=f"seconds in-flight calls get on SIGTERM (default {defaults.grace_period:g})")
    p.add_argument("--drain-delay", type=float, default=defaults.drain_delay,
                   help=f"seconds between NOT_SERVING and refusing calls (default {defaults.drain_delay:g})")
    p.add_argument("--workers", default="1", metavar="N|auto",
                   help="server processes behind the address (default 1; auto: one per core); with more than one, "
                        "SIGHUP restarts them one at a time (Linux, TCP addresses)")  # fmt: skip
    p.add_argument("--threads", type=int, default=defaults.max_workers,
                   help=f"thread-pool size of each sync server (default {defaults.max_workers}; "
                        "--workers set it before it counted processes)")  # fmt: skip
    p.add_argument("--no-reflection", action="store_true", help="do not serve grpc.reflection")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics on 127.0.0.1:PORT (0: a free one; needs rpcframe[prometheus])")
    p.add_argument("--access-log", action="store_true",
                   help="log one JSON line per call on the rpcframe.access logger (never credentials)")
    p.add_argument("--rate-limit", action="append", default=[], metavar="METHOD=RATE[/BURST][:per-caller]",
                   help="token bucket on METHOD ('pkg.Service/Method', 'pkg.Service' or '*'): RATE calls/s, BURST "
                        "at once (default: RATE); ':per-caller' gives each authenticated caller its own (repeatable)")
    p.add_argument("--no-overload-protection", action="store_true",
                   help="admit every call, however overloaded the server (default: adaptive admission control)")
    p.add_argument("--subscribers", default=None, metavar="MODULE:FUNCTION",
                   help="an async function returning event consumers/workers (rpcframe.events) to host beside the "
                        "servicers, on the asyncio server: each in the health service, drained on SIGTERM")  # fmt: skip
    p.add_argument("--accept-queue", type=int, default=None, metavar="N",
                   help="calls grpc may hold before the server takes them; more are refused (CANCELLED) before "
                        "any Python runs, which keeps goodput up under CPU saturation (default: grpc's 1000)")
    add_server_security_flags(p)
    p.set_defaults(run=run)


def _servicers(obj: Any) -> list[Any]:
    try:
        return servicers_of(obj)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    except Exception as exc:  # the factory's own failure
        raise CliError(f"cannot create servicers: {type(exc).__name__}: {exc}") from None


def _worker_count(text: str) -> int:
    """``--workers`` as a number of processes; CliError (exit 2) for what is not one."""
    cores = cpu_count()
    if text == "auto":
        return cores
    hint = "--workers counts server processes (1 or more, or auto); the thread-pool size is now --threads"
    try:
        count = int(text)
    except ValueError:
        raise CliError(f"--workers {text!r}: {hint}", 2) from None
    limit = max(8, 4 * cores)
    if count < 1:
        raise CliError(f"--workers {count}: {hint}", 2)
    if count > limit:
        raise CliError(f"--workers {count}: more than {limit} processes for {cores} cores; {hint}", 2)
    return count


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain (every worker, with ``--workers``)."""
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        raise CliError(f"--log-level {args.log_level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL", 2)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    workers = _worker_count(args.workers)
    binds: list[str] = args.bind or ["127.0.0.1:50051"]
    if workers == 1:
        # Loaded first, as always: a target that does not load is the first error reported.
        servicers = _servicers(load_object(args.target))
        _subscribers(args, servicers)  # its errors now, before binding
        for address in binds:
            split_host_port(address)
        config = _config(args)
        _serve(args, config, binds, lambda: servicers)
        return 0
    return _supervise(args, workers, binds)


def _supervise(args: argparse.Namespace, workers: int, binds: list[str]) -> int:
    """``--workers`` N > 1: this process forks the workers, prints the ready lines, restarts and stops them."""
    for address in binds:
        if address.startswith(("unix:", "unix-abstract:")):
            raise CliError(f"--bind {address}: several workers cannot share a unix socket; bind HOST:PORT", 2)
        split_host_port(address)
    if args.metrics_port is not None:
        raise CliError("--metrics-port serves one process's metrics: not available with --workers > 1", 2)
    config = _config(args)
    shared = with_reuseport(config)

    def main(addresses: list[str], ready: Callable[[], None]) -> None:
        _serve(args, shared, addresses, lambda: _servicers(load_object(args.target)), ready)

    def ready_lines(addresses: list[str]) -> None:
        print("".join(f"serving on {address}\n" for address in addresses), end="", flush=True)

    try:
        return Supervisor(main, binds, workers, stop_within=stop_within(config)).run(ready_lines)
    except WorkerError as exc:
        raise CliError(str(exc), exc.exit_code) from None
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _config(args: argparse.Namespace) -> ServerConfig:
    """The server configuration the flags ask for, before observers; CliError (exit 2) on bad values."""
    tls, auth = server_tls(args), server_auth(args)
    try:
        config = ServerConfig(max_workers=args.threads, reflection=not args.no_reflection, grace_period=args.grace,
                              drain_delay=args.drain_delay, tls=tls, auth=auth,
                              rate_limits=tuple(parse_rate_limit(spec) for spec in args.rate_limit))  # fmt: skip
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    if args.no_overload_protection:
        if args.accept_queue is not None:
            raise CliError("--accept-queue is part of overload protection: drop --no-overload-protection", 2)
        return dataclasses.replace(config, overload=None)
    if args.accept_queue is not None and config.overload is not None:
        try:
            overload = dataclasses.replace(config.overload, accept_queue=args.accept_queue)
        except ConfigError as exc:
            raise CliError(f"--accept-queue: {exc}", 2) from None
        config = dataclasses.replace(config, overload=overload)
    return config


def _serve(args: argparse.Namespace, config: ServerConfig, binds: list[str], servicers: Callable[[], list[Any]],
           ready: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Serve in this process (a worker when ``ready`` is given: it prints nothing, ``ready()`` says it serves)."""
    found = servicers()
    telemetry = _telemetry()
    try:
        observers, metrics_line = _observers(args)
        extra = telemetry.observers if telemetry is not None else ()
        config = dataclasses.replace(config, observers=(*observers, *extra))

        def ready_lines(ports: tuple[int, ...]) -> None:
            if ready is not None:
                ready()
                return
            print("".join(f"serving on {a}\n" for a in announced(binds, ports)) + metrics_line, end="", flush=True)

        serve_here(found, config, binds, aio=args.aio, uvloop=not args.no_uvloop, on_ready=ready_lines,
                   subscribers=_subscribers(args, found))  # fmt: skip
    except ConfigError as exc:
        raise bind_error(exc, binds) from None
    finally:
        if telemetry is not None:
            telemetry.shutdown()  # export the spans and metrics of the last calls


def _subscribers(args: argparse.Namespace, servicers: list[Any]) -> Any:
    """The ``--subscribers`` factory (None without the flag); CliError when it cannot be hosted."""
    if args.subscribers is None:
        return None
    factory = load_object(args.subscribers)
    if not inspect.iscoroutinefunction(factory):
        raise CliError(f"--subscribers {args.subscribers}: expected an async function returning consumers/workers", 2)
    if args.aio is False or not is_async(servicers):
        raise CliError("--subscribers runs on the asyncio server: serve asyncio servicers (async def methods), "
                       "not --sync ones", 2)  # fmt: skip
    return factory


def _telemetry() -> Any:
    """OpenTelemetry as the ``OTEL_*`` environment asks (None when it asks for nothing)."""
    if not any(key.startswith("OTEL_") for key in os.environ):
        return None  # the common case: not even importing OpenTelemetry
    try:
        from ..otel import from_environment
    except ImportError:
        raise CliError("OTEL_* variables are set but OpenTelemetry is not installed: "
                       "pip install 'rpcframe[otel]' (or unset them)", 2) from None  # fmt: skip
    try:
        telemetry = from_environment()
    except ConfigError as exc:  # an OTEL_* value it cannot follow
        raise CliError(str(exc), 2) from None
    if telemetry is not None:
        logging.getLogger("rpcframe.serve").info(
            "OpenTelemetry on: traces %s, metrics %s", "on" if telemetry.tracer_provider else "off",
            "on" if telemetry.meter_provider else "off",
        )  # fmt: skip
    return telemetry


def _observers(args: argparse.Namespace) -> tuple[tuple[Any, ...], str]:
    """The observers the flags ask for, and the line that announces the metrics endpoint ("" without one)."""
    observers: list[Any] = [AccessLog()] if args.access_log else []
    if args.metrics_port is None:
        return tuple(observers), ""
    try:
        from ..prometheus import PrometheusObserver, serve_metrics
    except ImportError:
        raise CliError("--metrics-port needs prometheus-client: pip install 'rpcframe[prometheus]'", 2) from None
    try:
        _, port = serve_metrics(args.metrics_port)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on 127.0.0.1:{args.metrics_port}: {exc.strerror}", 2) from None
    return (*observers, PrometheusObserver()), f"metrics on 127.0.0.1:{port}\n"


def parse_rate_limit(spec: str) -> RateLimit:
    """``METHOD=RATE[/BURST][:per-caller]`` as a :class:`~rpcframe.RateLimit` (ConfigError when malformed)."""
    method, sep, rest = spec.partition("=")
    rest, _, scope = rest.partition(":")
    rate_text, _, burst_text = rest.partition("/")
    if not sep or scope not in ("", "per-caller"):
        raise ConfigError(f"--rate-limit {spec!r}: expected METHOD=RATE[/BURST][:per-caller]")
    try:
        rate, burst = float(rate_text), float(burst_text) if burst_text else None
    except ValueError:
        raise ConfigError(f"--rate-limit {spec!r}: RATE and BURST must be numbers") from None
    return RateLimit(rate=rate, burst=burst, method=method.strip(), per_caller=scope == "per-caller")
