"""``rpcframe health TARGET [--service NAME] [--watch] [--tls-ca FILE ...]``, a drop-in grpc-health-probe.

Exit codes and flag spellings follow grpc-health-probe (``-addr``,
``-service``, ``-connect-timeout``, ``-rpc-timeout``, ``-tls-ca-cert``,
``-user-agent``, ``-rpc-header``, ``-gzip``, ``-v`` ...), so Kubernetes
probes written for it work unchanged. Not taken: ``-tls-no-verify``
(grpcio cannot skip certificate verification) and ``-alts``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..bench.spec import parse_duration
from ..client._sync import Channel
from ..config import ChannelConfig
from ..errors import ConfigError, DeadlineExceeded, NotFound, RpcError, Unavailable
from ._common import CliError, add_client_security_flags, check_target, client_security, split_host_port

#: grpc-health-probe's exit codes.
INVALID_ARGUMENTS, CONNECTION_FAILURE, RPC_FAILURE, UNHEALTHY = 1, 2, 3, 4

_EPILOG = """\
exit codes (those of grpc-health-probe):
  0  SERVING
  1  invalid arguments: bad flags or TARGET, TLS or token flags, unreadable
     certificate files
  2  connection failure: nothing listens at TARGET within the connect
     timeout, or the connection fails (TLS against a plaintext server or the
     reverse, an untrusted certificate, no client certificate for mTLS)
  3  RPC failure: the service is unknown to the server, the server has no
     health service, no answer within the RPC timeout, another error
  4  any status but SERVING (NOT_SERVING ...; with --watch, the last one)

--timeout sets both timeouts; --connect-timeout and --rpc-timeout override
it. Durations are seconds or Go-style: 500ms, 2s, 1m.
"""


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    """Add the subcommand to the parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "health", help="ask a server's grpc.health.v1 for a status (a drop-in grpc-health-probe)",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, usage_exit_code=INVALID_ARGUMENTS,
    )  # fmt: skip
    p.add_argument("target", nargs="?", metavar="TARGET", help="HOST:PORT of the server (or -addr)")
    p.add_argument("-addr", "--addr", metavar="HOST:PORT", help="the server, as grpc-health-probe names it")
    p.add_argument("--service", "-service", default="", help="service name (default: the whole server)")
    p.add_argument("--timeout", type=_duration, default=5.0,
                   help="seconds to wait for a connection, also to a server that is not listening yet, "
                        "and for the answer (default 5)")  # fmt: skip
    p.add_argument("--connect-timeout", "-connect-timeout", type=_duration, metavar="DURATION",
                   help="time to wait for a connection (default: --timeout)")  # fmt: skip
    p.add_argument("--rpc-timeout", "-rpc-timeout", type=_duration, metavar="DURATION",
                   help="time to wait for the answer once connected (default: --timeout)")  # fmt: skip
    p.add_argument("--watch", action="store_true", help="print every status change until interrupted")
    p.add_argument("--user-agent", "-user-agent", metavar="NAME", help="user-agent prefix to send")
    p.add_argument("--rpc-header", "-rpc-header", action="append", default=[], metavar="'KEY: VALUE'",
                   help="header to send with the check (repeatable)")  # fmt: skip
    p.add_argument("--gzip", "-gzip", action="store_true", help="compress the check with gzip")
    p.add_argument("-v", "--verbose", action="store_true", help="print how long connecting and the check took")
    add_client_security_flags(p, probe_spellings=True)
    p.set_defaults(run=run)


def _listening(target: str, timeout: float) -> bool:
    """Whether TARGET (a plain HOST:PORT) accepts TCP connections."""
    try:
        host, port = split_host_port(target)
    except CliError:
        return False  # a list, dns:///..., unix:...: cannot tell
    try:
        socket.create_connection((host.strip("[]"), port), timeout=max(timeout, 0.05)).close()
    except OSError:
        return False
    return True


def _connection_failed(target: str, tls: bool, exc: RpcError) -> CliError:
    if tls:
        hint = ("the TLS connection failed: check --tls-ca and --server-name; a server that requires client "
                "certificates also needs --tls-cert and --tls-key")  # fmt: skip
    else:
        hint = "it accepts connections but not plaintext gRPC: if it serves TLS, add --tls or --tls-ca FILE"
    return CliError(f"{target}: {hint} ({exc.details()})", CONNECTION_FAILURE)


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _probe(connect: Callable[[], Channel], stub: Any, request: Any, args: argparse.Namespace, tls: bool,
           deadline: float) -> tuple[Any, Unavailable | None]:  # fmt: skip
    """A Check that does not wait for a connection: ``(response, None)``, or ``(None, error)`` if nothing
    listens at TARGET (yet); ``deadline`` is the connect timeout's.

    A server that listens but with which no gRPC connection can be made (TLS
    against plaintext or the reverse, a refused client certificate) is an
    error at once, not after the whole timeout.
    """
    try:
        return stub.Check(request, timeout=args.rpc_timeout, wait_for_ready=False), None
    except Unavailable as exc:
        if not _listening(args.target, min(1.0, _remaining(deadline))):
            return None, exc
    # The server may only just have started listening: once more on a fresh
    # channel (the first one waits a backoff before it reconnects).
    with connect() as fresh:
        try:
            response = health_pb2_grpc.HealthStub(fresh).Check(request, timeout=args.rpc_timeout)
        except Unavailable as exc:
            state: list[grpc.ChannelConnectivity] = []
            fresh.subscribe(state.append)  # called at once with the current state
            if state[:1] == [grpc.ChannelConnectivity.READY]:
                raise  # connected: the server (or a proxy) itself answered UNAVAILABLE
            raise _connection_failed(args.target, tls, exc) from None
    return response, None


def _arguments(args: argparse.Namespace) -> None:
    """Settle TARGET / -addr and the timeouts in ``args``; CliError (exit 1) when they do not make sense."""
    if args.addr is not None and args.target is not None and args.addr != args.target:
        raise CliError(f"TARGET {args.target} and -addr {args.addr}: give one", INVALID_ARGUMENTS)
    args.target = args.target or args.addr
    if not args.target:
        raise CliError("give the server as TARGET or -addr HOST:PORT", INVALID_ARGUMENTS)
    args.connect_timeout = args.timeout if args.connect_timeout is None else args.connect_timeout
    args.rpc_timeout = args.timeout if args.rpc_timeout is None else args.rpc_timeout
    if not (args.connect_timeout > 0 and args.rpc_timeout > 0):
        raise CliError("timeouts must be > 0", INVALID_ARGUMENTS)


def _settings(args: argparse.Namespace) -> ChannelConfig:
    """The channel configuration; every bad argument is grpc-health-probe's exit 1."""
    try:
        _arguments(args)
        check_target(args.target)
        tls, token = client_security(args)
        extra: dict[str, Any] = {"metadata": tuple(_header(h) for h in args.rpc_header)}
        if args.user_agent:
            extra["user_agent"] = args.user_agent
        if args.gzip:
            extra.update(compression="gzip", compression_threshold=0)
        return ChannelConfig(tls=tls, token=token, **extra)
    except CliError as exc:
        raise CliError(str(exc), INVALID_ARGUMENTS) from None
    except ConfigError as exc:
        raise CliError(str(exc), INVALID_ARGUMENTS) from None


def _header(text: str) -> tuple[str, str]:
    """``'KEY: VALUE'`` as a metadata pair (keys are lower case in gRPC)."""
    key, sep, value = text.partition(":")
    if not sep or not key.strip():
        raise CliError(f"-rpc-header {text!r}: expected 'KEY: VALUE'", INVALID_ARGUMENTS)
    return key.strip().lower(), value.strip()


def _watch(stub: Any, request: Any, probe: Callable[[], object]) -> int:
    try:
        probe()
    except (NotFound, DeadlineExceeded):
        pass  # Watch reports SERVICE_UNKNOWN, and waits for a server that does not answer yet
    last = None
    for response in stub.Watch(request, wait_for_ready=True):
        last = response.status
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(last), flush=True)
    return 0 if last == health_pb2.HealthCheckResponse.SERVING else UNHEALTHY


def run(args: argparse.Namespace) -> int:
    """Print the status name; exit 0 only when SERVING, else grpc-health-probe's codes."""
    config = _settings(args)
    request = health_pb2.HealthCheckRequest(service=args.service)
    tls = config.tls is not None

    def connect() -> Channel:
        try:
            return Channel(args.target, config)
        except ConfigError as exc:
            raise CliError(str(exc), INVALID_ARGUMENTS) from None

    started = time.monotonic()
    deadline = started + args.connect_timeout
    with connect() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            if args.watch:
                return _watch(stub, request, lambda: _probe(connect, stub, request, args, tls, deadline))
            response, unreachable = _probe(connect, stub, request, args, tls, deadline)
            if unreachable is not None:
                # Nothing listens (yet): wait for the server to come up, within the connect timeout.
                try:
                    channel.wait_ready(_remaining(deadline))
                except Unavailable:
                    reason = unreachable.details()
                    message = f"{args.target}: no connection within {args.connect_timeout:g}s ({reason})"
                    raise CliError(message, CONNECTION_FAILURE) from None
                response = stub.Check(request, timeout=args.rpc_timeout)
        except NotFound:
            raise CliError(f"{args.target}: service {args.service!r} is unknown to the server", RPC_FAILURE) from None
        except DeadlineExceeded:
            raise CliError(f"{args.target}: no answer within {args.rpc_timeout:g}s", RPC_FAILURE) from None
        except RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise CliError(f"{args.target}: the server has no health service", RPC_FAILURE) from None
            raise CliError(f"{args.target}: {exc}", RPC_FAILURE) from None
    if args.verbose:  # grpc-health-probe's -v: timings on stderr, the status alone on stdout
        print(f"{args.target}: answered in {(time.monotonic() - started) * 1000:.1f} ms", file=sys.stderr)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else UNHEALTHY
