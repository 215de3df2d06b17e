"""``rpcframe health TARGET [--service NAME] [--watch] [--tls-ca FILE ...]``."""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..client._sync import Channel
from ..config import ChannelConfig
from ..errors import ConfigError, DeadlineExceeded, NotFound, RpcError, Unavailable
from ._common import CliError, add_client_security_flags, check_target, client_security, split_host_port

_EPILOG = """\
exit codes:
  0  SERVING
  1  any other status (NOT_SERVING, SERVICE_UNKNOWN with --watch ...)
  2  usage: bad arguments, TLS or token flags, unreadable certificate files
  3  the service is unknown to the server, or the server has no health service
  4  no answer: nothing listens at TARGET within --timeout, the connection
     fails (TLS against a plaintext server or the reverse, an untrusted
     certificate, no client certificate for an mTLS server), or another error
"""


def register(sub: Any) -> None:
    """Add the subcommand to the parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "health", help="ask a server's grpc.health.v1 for a status",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("target", help="HOST:PORT of the server")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait, also for a server that is not listening yet (default 5)")  # fmt: skip
    p.add_argument("--watch", action="store_true", help="print every status change until interrupted")
    add_client_security_flags(p)
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
    return CliError(f"{target}: {hint} ({exc.details()})", 4)


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _probe(connect: Callable[[], Channel], stub: Any, request: Any, args: argparse.Namespace, tls: bool,
           deadline: float) -> tuple[Any, Unavailable | None]:  # fmt: skip
    """A Check that does not wait for a connection: ``(response, None)``, or ``(None, error)`` if nothing
    listens at TARGET (yet).

    A server that listens but with which no gRPC connection can be made (TLS
    against plaintext or the reverse, a refused client certificate) is an
    error at once, not after the whole --timeout.
    """
    try:
        return stub.Check(request, timeout=_remaining(deadline), wait_for_ready=False), None
    except Unavailable as exc:
        if not _listening(args.target, min(1.0, _remaining(deadline))):
            return None, exc
    # The server may only just have started listening: once more on a fresh
    # channel (the first one waits a backoff before it reconnects).
    with connect() as fresh:
        try:
            response = health_pb2_grpc.HealthStub(fresh).Check(request, timeout=_remaining(deadline))
        except Unavailable as exc:
            state: list[grpc.ChannelConnectivity] = []
            fresh.subscribe(state.append)  # called at once with the current state
            if state[:1] == [grpc.ChannelConnectivity.READY]:
                raise  # connected: the server (or a proxy) itself answered UNAVAILABLE
            raise _connection_failed(args.target, tls, exc) from None
    return response, None


def run(args: argparse.Namespace) -> int:
    """Print the status name; exit 0 only when SERVING."""
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name
    check_target(args.target)
    request = health_pb2.HealthCheckRequest(service=args.service)
    tls, token = client_security(args)

    def connect() -> Channel:
        try:
            return Channel(args.target, ChannelConfig(tls=tls, token=token))
        except ConfigError as exc:
            raise CliError(str(exc), 2) from None

    deadline = time.monotonic() + args.timeout
    with connect() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            if args.watch:
                try:
                    _probe(connect, stub, request, args, tls is not None, deadline)
                except (NotFound, DeadlineExceeded):
                    pass  # Watch reports SERVICE_UNKNOWN, and waits for a server that does not answer yet
                last = None
                for response in stub.Watch(request, wait_for_ready=True):
                    last = response.status
                    print(status_name(last), flush=True)
                return 0 if last == health_pb2.HealthCheckResponse.SERVING else 1
            response, unreachable = _probe(connect, stub, request, args, tls is not None, deadline)
            if unreachable is not None:
                # Nothing listens (yet): wait for the server to come up, within --timeout.
                try:
                    response = stub.Check(request, timeout=_remaining(deadline), wait_for_ready=True)
                except DeadlineExceeded:
                    reason = unreachable.details()
                    raise CliError(f"{args.target}: no answer within {args.timeout}s ({reason})", 4) from None
        except NotFound:
            raise CliError(f"{args.target}: service {args.service!r} is unknown to the server", 3) from None
        except DeadlineExceeded:
            raise CliError(f"{args.target}: no answer within {args.timeout}s", 4) from None
        except RpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise CliError(f"{args.target}: the server has no health service", 3) from None
            raise CliError(f"{args.target}: {exc}", 4) from None
    print(status_name(response.status))
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1
