"""``rpcframe serve MODULE:OBJECT --bind HOST:PORT [--tls-cert FILE --tls-key FILE [--client-ca FILE]]``."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from .. import _loop
from ..accesslog import AccessLog
from ..config import RateLimit, ServerConfig
from ..errors import ConfigError
from ..server import _aio, _sync
from ._common import CliError, add_server_security_flags, load_object, server_auth, server_tls, split_host_port


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
    p.add_argument("--workers", type=int, default=defaults.max_workers,
                   help=f"thread-pool size of the sync server (default {defaults.max_workers})")
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
    add_server_security_flags(p)
    p.set_defaults(run=run)


def _servicers(obj: Any) -> list[Any]:
    if inspect.isclass(obj) or (callable(obj) and not _looks_like_servicer(obj)):
        try:
            obj = obj()
        except Exception as exc:
            raise CliError(f"cannot create servicers: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, Iterable) and not isinstance(obj, str | bytes) and not _looks_like_servicer(obj):
        items = list(obj)
    else:
        items = [obj]
    if not items or not all(_looks_like_servicer(s) for s in items):
        raise CliError("the object must be a servicer (subclass of a generated *Servicer), "
                       "a class, or a factory returning one or a list of them", 2)  # fmt: skip
    return items


def _looks_like_servicer(obj: Any) -> bool:
    return any(c.__module__.endswith("_pb2_grpc") for c in type(obj).__mro__[1:])


def _is_async(servicers: list[Any]) -> bool:
    """Whether the servicers' own (overridden) methods are coroutines."""
    for servicer in servicers:
        for name, member in inspect.getmembers(type(servicer)):
            if name.startswith("_") or member.__module__ is None:
                continue
            if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
                return True
    return False


def _ready_line(server: _sync.Server | _aio.Server, binds: list[str], metrics_line: str = "") -> None:
    for address, port in zip(binds, server.ports, strict=True):
        host, _ = split_host_port(address)
        print(f"serving on {host}:{port}", flush=True)
    print(metrics_line, end="", flush=True)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    servicers = _servicers(load_object(args.target))
    binds: list[str] = args.bind or ["127.0.0.1:50051"]
    for address in binds:
        split_host_port(address)
    tls, auth = server_tls(args), server_auth(args)
    try:
        telemetry = _telemetry()
        observers, metrics_line = _observers(args)
        observers = (*observers, *(telemetry.observers if telemetry is not None else ()))
        config = ServerConfig(max_workers=args.workers, reflection=not args.no_reflection, grace_period=args.grace,
                              drain_delay=args.drain_delay, tls=tls, auth=auth, observers=observers,
                              rate_limits=tuple(parse_rate_limit(spec) for spec in args.rate_limit))  # fmt: skip
        if args.no_overload_protection:
            config = dataclasses.replace(config, overload=None)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    use_aio = _is_async(servicers) if args.aio is None else args.aio
    try:
        if use_aio:
            _loop.run(_serve_aio(config, servicers, binds, metrics_line), use_uvloop=not args.no_uvloop)
        else:
            server = _sync.Server(config)
            _setup(server, servicers, binds)
            server.run(on_ready=lambda: _ready_line(server, binds, metrics_line))
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    finally:
        if telemetry is not None:
            telemetry.shutdown()  # export the spans and metrics of the last calls
    return 0


def _telemetry() -> Any:
    """OpenTelemetry as the ``OTEL_*`` environment asks (None when it asks for nothing)."""
    if not any(key.startswith("OTEL_") for key in os.environ):
        return None  # the common case: not even importing OpenTelemetry
    try:
        from ..otel import from_environment
    except ImportError:
        raise CliError("OTEL_* variables are set but OpenTelemetry is not installed: "
                       "pip install 'rpcframe[otel]' (or unset them)", 2) from None  # fmt: skip
    telemetry = from_environment()
    if telemetry is not None:
        logging.getLogger("rpcframe.serve").info(
            "OpenTelemetry on: traces %s, metrics %s", "on" if telemetry.tracer_provider else "off",
            "on" if telemetry.meter_provider else "off",
        )  # fmt: skip
    return telemetry


def _setup(server: _sync.Server | _aio.Server, servicers: list[Any], binds: list[str]) -> None:
    for servicer in servicers:
        server.add(servicer)
    for address in binds:
        server.bind(address)


async def _serve_aio(config: ServerConfig, servicers: list[Any], binds: list[str], metrics_line: str) -> None:
    server = _aio.Server(config)
    _setup(server, servicers, binds)
    await server.run(on_ready=lambda: _ready_line(server, binds, metrics_line))


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
