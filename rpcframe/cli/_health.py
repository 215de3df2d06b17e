"""``rpcframe health TARGET [--service NAME] [--watch]``."""

from __future__ import annotations

import argparse
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..client._sync import Channel
from ..errors import DeadlineExceeded, NotFound, RpcError
from ._common import CliError


def register(sub: Any) -> None:
    """Add the subcommand to the parser."""
    p: argparse.ArgumentParser = sub.add_parser("health", help="ask a server's grpc.health.v1 for a status")
    p.add_argument("target", help="HOST:PORT of the server")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p.add_argument("--watch", action="store_true", help="print every status change until interrupted")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the status name; exit 0 only when SERVING."""
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name
    request = health_pb2.HealthCheckRequest(service=args.service)
    with Channel(args.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            if args.watch:
                last = None
                for response in stub.Watch(request, wait_for_ready=True):
                    last = response.status
                    print(status_name(last), flush=True)
                return 0 if last == health_pb2.HealthCheckResponse.SERVING else 1
            response = stub.Check(request, timeout=args.timeout, wait_for_ready=True)
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
