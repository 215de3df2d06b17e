"""``rpcframe call TARGET pkg.Service/Method``: call one method from the shell, like grpcurl.

Examples::

    rpcframe call 127.0.0.1:50051 rpcframe.echo.v1.EchoService/Echo -d '{"message": "hi"}'
    rpcframe call a:1,b:2 rpcframe.echo.v1.EchoService/Expand -d '{"message": "m", "count": 3}'
    printf '{"message": "a"}\\n{"message": "b"}\\n' | rpcframe call HOST:PORT pkg.Svc/Collect -d -
    rpcframe call HOST:PORT --list
    rpcframe call HOST:PORT --describe rpcframe.echo.v1.EchoService/Echo

The call goes through rpcframe's own client (:func:`rpcframe.connect`), so
balancing, failover, deadlines and the contract's retry policy apply. Message
types come from generated stubs or server reflection, found the way
``rpcframe bench`` finds them (:mod:`rpcframe.bench.methods`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from ..client._sync import Channel, connect
from ..config import ChannelConfig
from ..errors import ConfigError
from ._common import CliError, add_client_security_flags, check_target, client_security

if TYPE_CHECKING:
    from ..bench.methods import MethodInfo

__all__ = ["register", "run"]

#: Exit code of a call that ended with gRPC status N is STATUS_EXIT_BASE + N (grpcurl's scheme).
STATUS_EXIT_BASE = 64

_EPILOG = f"""\
requests and responses:
  Requests are protobuf JSON. -d JSON sends one request (default {{}}); -d @FILE
  and -d - (stdin) hold one JSON document for unary and server-streaming
  methods, and one document per line for client-streaming and bidi methods
  (read as the call goes, so stdin can be interactive). Each response prints
  as one line of JSON as it arrives, with the .proto field names.

exit codes:
  0      the call succeeded
  1      the call could not be made: unknown service or method, no stubs and
         no reflection, unreadable -d file, --proto-module that fails to import
  2      usage: bad arguments, header, TLS or token flags, or request JSON
         (malformed, or a field the message does not have)
  {STATUS_EXIT_BASE}+N   the call ended with gRPC status N, printed as
         'rpcframe: error: CODE: details' (like grpcurl): {STATUS_EXIT_BASE + 1} CANCELLED,
         {STATUS_EXIT_BASE + 4} DEADLINE_EXCEEDED, {STATUS_EXIT_BASE + 5} NOT_FOUND, \
{STATUS_EXIT_BASE + 12} UNIMPLEMENTED, {STATUS_EXIT_BASE + 13} INTERNAL,
         {STATUS_EXIT_BASE + 14} UNAVAILABLE (e.g. nothing listens at TARGET), \
{STATUS_EXIT_BASE + 16} UNAUTHENTICATED ...
  130    interrupted; 141 stdout closed early (e.g. piped into head)
"""

_HEADER_KEY = re.compile(r"^[0-9a-z_.-]+$")
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}  # fmt: skip
_STDIN = ("-", "@-")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def register(sub: Any) -> None:
    """Add the subcommand to the parser."""
    p: argparse.ArgumentParser = sub.add_parser(
        "call", help="call a method with JSON requests (like grpcurl), or list and describe services",
        description="Call one method of a gRPC server through rpcframe's client, or list and describe "
                    "its services by reflection.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("target", metavar="TARGET", help="HOST:PORT, a comma-separated list, dns:///HOST:PORT ...")
    p.add_argument("method", nargs="?", metavar="PKG.SERVICE/METHOD", help="the method to call")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the services the server offers (by reflection)")
    what.add_argument("--describe", metavar="SYMBOL",
                      help="show a service, method (pkg.Service/Method) or message (by reflection)")  # fmt: skip
    p.add_argument("-d", "--data", default=None, metavar="JSON|@FILE|-", help="the request(s): see below")
    p.add_argument("--timeout", type=_seconds, default=10.0,
                   help="deadline of the call, and of each reflection request, in seconds "
                        "(default 10; 0 for none)")  # fmt: skip
    p.add_argument("-H", "--header", action="append", default=[], metavar="'KEY: VALUE'",
                   help="metadata sent with the call and reflection requests (repeatable; "
                        "values of -bin keys are base64)")  # fmt: skip
    types = p.add_mutually_exclusive_group()
    types.add_argument("--proto-module", action="append", default=[], metavar="MODULE",
                       help="generated *_pb2 module defining the service (repeatable; default: look under "
                            "generated/, then ask the server's reflection)")  # fmt: skip
    types.add_argument("--reflection", action="store_true", help="take message types only from server reflection")
    p.add_argument("--emit-defaults", action="store_true", help="print fields that hold their default value")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print to stderr the method, where its types came from, response headers and "
                        "trailers")  # fmt: skip
    add_client_security_flags(p)
    p.set_defaults(run=run)


# --- connection ----------------------------------------------------------------------------------


def headers(items: Sequence[str]) -> tuple[tuple[str, str | bytes], ...]:
    out: list[tuple[str, str | bytes]] = []
    for item in items:
        key, sep, value = item.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not sep or not _HEADER_KEY.match(key):
            raise CliError(f"-H {item!r}: expected 'key: value' with a key of a-z, 0-9, '-', '_', '.'", 2)
        if key.startswith("grpc-"):
            raise CliError(f"-H {item!r}: 'grpc-' keys are reserved for gRPC itself", 2)
        if key.endswith("-bin"):
            try:
                out.append((key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True)))
            except binascii.Error:
                raise CliError(f"-H {item!r}: the value of a '-bin' key must be base64", 2) from None
        else:
            out.append((key, value))
    return tuple(out)


def _open_channel(args: argparse.Namespace, timeout: float | None) -> Channel:
    tls, token = client_security(args)
    try:
        config = ChannelConfig(default_timeout=timeout, metadata=headers(args.header), tls=tls, token=token)
        return connect(args.target, config)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None


def _status_error(exc: grpc.RpcError, verbose: bool) -> CliError:
    code: grpc.StatusCode = exc.code()
    if verbose:
        _print_metadata("trailer", exc.trailing_metadata())
    return CliError(f"{code.name}: {exc.details() or ''}".rstrip(), STATUS_EXIT_BASE + code.value[0])


def _print_metadata(label: str, metadata: Any) -> None:
    for key, value in metadata or ():
        text = base64.b64encode(value).decode() if isinstance(value, bytes) else value
        print(f"{label}: {key}: {text}", file=sys.stderr)


# --- requests --------------------------------------------------------------------------------------


def _parse(message_class: type[Message], text: str, where: str) -> Message:
    """One request from JSON; errors name the place and the field."""
    full_name = message_class.DESCRIPTOR.full_name
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise CliError(f"{where}: not JSON: {exc}", 2) from None
    if not isinstance(value, dict):
        raise CliError(f"{where}: expected a JSON object (a {full_name}), got {_JSON_TYPES[type(value)]}", 2)
    message = message_class()
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        raise CliError(f"{where}: not a valid {full_name}: {' '.join(str(exc).split())}", 2) from None
    return message


class _Input:
    """Where requests come from: ``-d JSON``, ``-d @FILE`` or ``-d -`` (stdin); opened before the call."""

    def __init__(self, data: str | None) -> None:
        self.inline: str | None = "{}" if data is None else None
        self.name = "-d"
        self.stream: IO[str] | None = None
        if data is None:
            return
        if data in _STDIN:
            self.name, self.stream = "stdin", sys.stdin
        elif data.startswith("@"):
            self.name = data[1:]
            try:
                self.stream = open(self.name, encoding="utf-8")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise CliError(f"-d {data}: {exc.strerror or exc}") from None
        else:
            self.inline = data

    def whole(self) -> tuple[str, str]:
        """(where, text) of the one request of a unary or server-streaming call."""
        if self.stream is None:
            return self.name, self.inline or ""
        try:
            return self.name, self.stream.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {self.name}: {exc}") from None

    def lines(self) -> Iterator[tuple[str, str]]:
        """(where, text) of each request of a client-streaming call, read as they are needed."""
        if self.stream is None:
            yield self.name, self.inline or ""
            return
        for number, line in enumerate(self.stream, 1):
            if line.strip():
                yield f"{self.name} line {number}", line

    def close(self) -> None:
        if self.stream is not None and self.stream is not sys.stdin:
            self.stream.close()


class _RequestStream:
    """Requests of a client stream, parsed as grpc asks for them.

    A line that does not parse cancels the call rather than ending the
    stream: the server must not take a truncated stream for a complete one.
    """

    def __init__(self, source: _Input, message_class: type[Message]) -> None:
        self._source = source
        self._class = message_class
        self._call: Any = None
        self._bound = threading.Event()
        self.error: CliError | None = None

    def bind(self, call: Any) -> None:
        """The started call, to cancel on bad input."""
        self._call = call
        self._bound.set()

    def __iter__(self) -> Iterator[Message]:
        try:
            for where, text in self._source.lines():
                yield _parse(self._class, text, where)
        except (CliError, OSError, UnicodeDecodeError) as exc:  # runs in grpc's request thread
            self.error = exc if isinstance(exc, CliError) else CliError(f"cannot read {self._source.name}: {exc}")
            if self._bound.wait(5):
                self._call.cancel()


# --- calls -----------------------------------------------------------------------------------------


def _import_modules(names: Sequence[str]) -> None:
    import importlib

    if os.getcwd() not in sys.path:  # like `python -m`
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - user code: any failure is an input error
            raise CliError(f"cannot import --proto-module {name!r}: {' '.join(str(exc).split())}") from None


def _message_classes(info: MethodInfo) -> tuple[type[Message], type[Message]]:
    """Request and response classes of a resolved method.

    Types learnt by reflection join the default descriptor pool, where the
    channel looks up the contract's ``idempotency_level`` (so retries follow
    it) and JSON finds the types ``Any`` fields name.
    """
    pool = descriptor_pool.Default()
    if info.source == "reflection":
        for data in info.files:
            try:
                pool.AddSerializedFile(data)
            except Exception:  # noqa: BLE001, S112 - a file of that name is there already
                continue
    try:
        pool.FindMethodByName(info.path.lstrip("/").replace("/", "."))
        return (
            message_factory.GetMessageClass(pool.FindMessageTypeByName(info.request_type)),
            message_factory.GetMessageClass(pool.FindMessageTypeByName(info.response_type)),
        )
    except KeyError:  # the default pool holds other definitions of these names
        return info.message_classes()


def _call(channel: Channel, args: argparse.Namespace, timeout: float | None) -> int:
    from ..bench.methods import KIND_LABELS, parse_method_name, resolve_method
    from ..bench.spec import BenchError

    try:
        parse_method_name(args.method)
    except BenchError:
        raise CliError(f"{args.method!r}: expected package.Service/Method", 2) from None
    source = _Input(args.data)
    try:
        if not args.reflection:
            _import_modules(args.proto_module)
        try:
            info = resolve_method(
                args.method, args.target, proto_module=args.proto_module[0] if args.proto_module else None,
                reflection=True if args.reflection else None, channel=channel,
            )  # fmt: skip
        except BenchError as exc:
            raise CliError(" ".join(str(exc).split())) from None
        request_class, response_class = _message_classes(info)
        if args.verbose:
            print(f"method: {info.path} ({KIND_LABELS[info.kind]}, types from {info.source})", file=sys.stderr)
        return _invoke(channel, info, source, request_class, response_class, args, timeout)
    finally:
        source.close()


def _invoke(
    channel: Channel,
    info: MethodInfo,
    source: _Input,
    request_class: type[Message],
    response_class: type[Message],
    args: argparse.Namespace,
    timeout: float | None,
) -> int:
    def emit(response: Message) -> None:
        text = json_format.MessageToJson(
            response, preserving_proto_field_name=True, indent=None, ensure_ascii=False,
            always_print_fields_with_no_presence=args.emit_defaults,
        )  # fmt: skip
        print(text, flush=True)

    def show(label: str, metadata: Any) -> None:
        if args.verbose:
            _print_metadata(label, metadata)

    multicallable = getattr(channel, info.kind)(
        info.path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_class.FromString
    )
    requests: _RequestStream | None = None
    try:
        if info.kind in ("unary_unary", "unary_stream"):
            where, text = source.whole()
            request = _parse(request_class, text, where)
            if info.kind == "unary_unary":
                response, call = multicallable.with_call(request, timeout=timeout)
                show("header", call.initial_metadata())
                emit(response)
                show("trailer", call.trailing_metadata())
                return 0
            stream = multicallable(request, timeout=timeout)
        else:
            requests = _RequestStream(source, request_class)
            if info.kind == "stream_unary":
                future = multicallable.future(iter(requests), timeout=timeout)
                requests.bind(future)
                response = future.result()
                if requests.error is not None:
                    raise requests.error
                show("header", future.call.initial_metadata())
                emit(response)
                show("trailer", future.call.trailing_metadata())
                return 0
            stream = multicallable(iter(requests), timeout=timeout)
            requests.bind(stream)
        first = True
        for response in stream:
            if first:
                show("header", stream.initial_metadata())
                first = False
            emit(response)
        if requests is not None and requests.error is not None:
            raise requests.error
        if first:
            show("header", stream.initial_metadata())
        show("trailer", stream.trailing_metadata())
        return 0
    except (grpc.RpcError, grpc.FutureCancelledError) as exc:
        if requests is not None and requests.error is not None:
            raise requests.error from None  # the call was cancelled because of it
        if not isinstance(exc, grpc.RpcError):  # pragma: no cover - only bad input cancels a call
            raise CliError("CANCELLED: the call was cancelled", STATUS_EXIT_BASE + 1) from None
        raise _status_error(exc, args.verbose) from None


# --- reflection: --list and --describe --------------------------------------------------------------


def _reflection(channel: Channel, target: str) -> tuple[Any, list[str]]:
    """The reflection database over ``channel`` and the services it names."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(channel)
    try:
        services = sorted(database.get_services())
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            raise CliError(f"{target} does not serve reflection (grpc.reflection.v1alpha)") from None
        raise
    return database, services


def _list(channel: Channel, args: argparse.Namespace) -> int:
    _, services = _reflection(channel, args.target)
    for name in services:
        print(name)
    return 0


_SCALARS = {
    getattr(FieldDescriptor, name): name.removeprefix("TYPE_").lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_") and name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def _field_type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            return f"map<{_field_type(key)}, {_field_type(value)}>"
        return str(entry.full_name)
    if field.enum_type is not None:
        return str(field.enum_type.full_name)
    return _SCALARS.get(field.type, "?")


def _describe_message(message: Descriptor) -> list[str]:
    lines = [f"message {message.full_name} {{"]
    for field in message.fields:
        repeated = field.is_repeated and not (field.message_type and field.message_type.GetOptions().map_entry)
        lines.append(f"  {'repeated ' if repeated else ''}{_field_type(field)} {field.name} = {field.number};")
    lines.append("}")
    return lines


def _rpc_line(method: MethodDescriptor) -> str:
    request = f"{'stream ' if method.client_streaming else ''}{method.input_type.full_name}"
    response = f"{'stream ' if method.server_streaming else ''}{method.output_type.full_name}"
    # The contract's idempotency level decides what rpcframe may retry and hedge: show it.
    level = method.GetOptions().idempotency_level
    if level:
        name = descriptor_pb2.MethodOptions.IdempotencyLevel.Name(level)
        return f"rpc {method.name}({request}) returns ({response}) {{ option idempotency_level = {name}; }}"
    return f"rpc {method.name}({request}) returns ({response});"


def _describe(channel: Channel, args: argparse.Namespace) -> int:
    database, services = _reflection(channel, args.target)
    pool = descriptor_pool.DescriptorPool(database)
    symbol = args.describe.strip().lstrip("/")
    service_name, _, method_name = symbol.partition("/")
    if not method_name and service_name not in services:
        # pkg.Service.Method names a method too.
        owner, _, last = service_name.rpartition(".")
        if owner in services:
            service_name, method_name = owner, last
    if service_name in services:
        service: ServiceDescriptor = pool.FindServiceByName(service_name)
        if not method_name:
            print(f"service {service.full_name} {{")
            for method in service.methods:
                print(f"  {_rpc_line(method)}")
            print("}")
            return 0
        found = service.methods_by_name.get(method_name)
        if found is None:
            names = ", ".join(sorted(service.methods_by_name)) or "none"
            raise CliError(f"service {service_name} has no method {method_name!r} (it has: {names})")
        print(f"{service.full_name}/{_rpc_line(found).removeprefix('rpc ')}")
        for message in (found.input_type, found.output_type):
            print("\n".join(_describe_message(message)))
        return 0
    if not method_name:
        try:
            print("\n".join(_describe_message(pool.FindMessageTypeByName(symbol))))
            return 0
        except KeyError:
            pass
    known = ", ".join(services) or "none"
    raise CliError(f"{args.target} does not serve {args.describe!r} (it serves: {known})")


def run(args: argparse.Namespace) -> int:
    """Call the method (or list / describe); print responses as JSON lines."""
    modes = sum((args.method is not None, args.list, args.describe is not None))
    if modes != 1:
        raise CliError("give one of PKG.SERVICE/METHOD, --list or --describe SYMBOL", 2)
    if args.method is None and (args.data is not None or args.proto_module or args.reflection):
        raise CliError("-d, --proto-module and --reflection go with a method call", 2)
    check_target(args.target)
    timeout = args.timeout or None
    try:
        with _open_channel(args, timeout) as channel:
            try:
                if args.list:
                    return _list(channel, args)
                if args.describe is not None:
                    return _describe(channel, args)
                return _call(channel, args, timeout)
            except grpc.RpcError as exc:  # reflection requests, and calls before their response loop
                raise _status_error(exc, args.verbose) from None
    except BrokenPipeError:
        # The reader left (`| head`): no "Exception ignored" noise when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
