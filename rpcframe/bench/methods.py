"""Find a method's message types: from generated stubs or server reflection.

``resolve_method("pkg.Service/Method", ...)`` looks in the default
descriptor pool (after importing ``--proto-module``, or every ``*_pb2``
module of the service's package under ``generated/`` or the import path),
and asks the server's reflection service when the stubs do not know the
service. Either way the result carries the serialized file descriptors, so
a load-generator process rebuilds the message classes without importing or
asking anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor, MethodDescriptor

from .spec import KIND_LABELS, BenchError, MethodInfo

__all__ = ["KIND_LABELS", "MethodInfo", "build_request", "parse_method_name", "resolve_method"]

# Where protoc output usually lives relative to the proto package.
_STUB_ROOTS = ("generated.", "")


def parse_method_name(text: str) -> tuple[str, str]:
    """``pkg.Service/Method`` (also ``/pkg.Service/Method``, ``pkg.Service.Method``) -> (service, method)."""
    name = text.strip().lstrip("/")
    service, sep, method = name.rpartition("/")
    if not sep:
        service, sep, method = name.rpartition(".")
    if not sep or not service or not method or "/" in service:
        raise BenchError(f"--method {text!r}: expected package.Service/Method")
    return service, method


def _info_from(method: MethodDescriptor, source: str) -> MethodInfo:
    if method.client_streaming:
        kind = "stream_stream" if method.server_streaming else "stream_unary"
    else:
        kind = "unary_stream" if method.server_streaming else "unary_unary"
    files: list[bytes] = []
    _collect_files(method.containing_service.file, set(), files)
    return MethodInfo(
        path=f"/{method.containing_service.full_name}/{method.name}",
        kind=kind,
        request_type=method.input_type.full_name,
        response_type=method.output_type.full_name,
        files=tuple(files),
        source=source,
    )


def _collect_files(fd: FileDescriptor, seen: set[str], out: list[bytes]) -> None:
    if fd.name in seen:
        return
    seen.add(fd.name)
    for dep in fd.dependencies:
        _collect_files(dep, seen, out)
    proto = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(proto)
    out.append(proto.SerializeToString())


def _find_in_pool(pool: Any, service: str, method: str) -> MethodDescriptor | None:
    """The method, None if the pool does not know the service; BenchError if only the method is unknown."""
    try:
        svc = pool.FindServiceByName(service)
    except KeyError:
        return None
    found = svc.methods_by_name.get(method)
    if found is None:
        names = ", ".join(sorted(svc.methods_by_name)) or "none"
        raise BenchError(f"service {service} has no method {method!r} (it has: {names})")
    return found  # type: ignore[no-any-return]


def _import_stubs(service: str) -> None:
    """Import the ``*_pb2`` modules of the service's proto package (best effort).

    Only packages that contain ``*_pb2`` modules are imported, so a method
    name never makes this import an unrelated module.
    """
    package = service.rpartition(".")[0]
    for root in _STUB_ROOTS:
        name = root + package
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a parent package is missing
            continue
        locations = spec.submodule_search_locations if spec is not None else None
        if not locations:
            continue
        for info in pkgutil.iter_modules(locations):
            if info.name.endswith("_pb2"):
                try:
                    importlib.import_module(f"{name}.{info.name}")
                except Exception:  # noqa: BLE001 - a broken neighbour must not hide the others
                    continue


def resolve_method(
    name: str,
    target: str,
    *,
    proto_module: str | None = None,
    reflection: bool | None = None,
    connect_timeout: float = 5.0,
    channel: grpc.Channel | None = None,
) -> MethodInfo:
    """Resolve ``package.Service/Method`` to its kind and message descriptors.

    Args:
        name: the method name (see :func:`parse_method_name`).
        target: the server, asked through reflection when needed.
        proto_module: a generated ``*_pb2`` module to import first.
        reflection: True: only reflection; False: only stubs; None: stubs,
            then reflection.
        connect_timeout: seconds to wait for the server (reflection only).
        channel: an open channel to ask reflection on instead of a plaintext
            one to ``target`` (so its TLS, token and balancing apply); its
            errors other than UNIMPLEMENTED propagate as ``grpc.RpcError``.
    """
    service, method = parse_method_name(name)
    if reflection is not True:
        # Like `python -m`, generated packages resolve from the working directory.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        if proto_module:
            try:
                importlib.import_module(proto_module)
            except Exception as exc:  # noqa: BLE001 - import errors of user code are input errors here
                raise BenchError(f"cannot import --proto-module {proto_module!r}: {exc}") from None
        pool = descriptor_pool.Default()
        found = _find_in_pool(pool, service, method)
        if found is None and not proto_module:
            _import_stubs(service)
            found = _find_in_pool(pool, service, method)
        if found is not None:
            return _info_from(found, "stubs")
        if reflection is False:
            raise BenchError(f"unknown service {service!r}: no generated stubs define it (try --proto-module)")
    if channel is not None:
        return _reflect(channel, service, method, target)
    return _from_reflection(service, method, target, connect_timeout)


def _from_reflection(service: str, method: str, target: str, connect_timeout: float) -> MethodInfo:
    from ..client._sync import close_unwatched

    channel = grpc.insecure_channel(target)
    try:
        ready = grpc.channel_ready_future(channel)
        try:
            ready.result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()  # stop watching the channel, so it can be closed at once
            raise BenchError(f"cannot connect to {target} within {connect_timeout:g}s") from None
        try:
            return _reflect(channel, service, method, target)
        except grpc.RpcError as exc:
            raise BenchError(f"reflection request to {target} failed: {exc.code().name}: {exc.details()}") from None
    finally:
        close_unwatched(channel)  # the ready-future may have just unsubscribed


def _reflect(channel: grpc.Channel, service: str, method: str, target: str) -> MethodInfo:
    """Ask the server's reflection over ``channel``; RPC errors other than UNIMPLEMENTED propagate."""
    # Imported here: only runs that need reflection pay for it.
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(channel)
    try:
        file_proto = database.FindFileContainingSymbol(service)
    except KeyError:
        known = ", ".join(s for s in database.get_services() if not s.startswith("grpc.")) or "none"
        raise BenchError(f"{target} does not serve {service!r} (it serves: {known})") from None
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            raise BenchError(
                f"{service!r} is not in any generated stubs and {target} does not serve reflection; pass --proto-module"
            ) from None
        raise
    files: list[descriptor_pb2.FileDescriptorProto] = []
    _collect_reflected(database, file_proto, set(), files)
    pool = descriptor_pool.DescriptorPool()
    for proto in files:
        pool.Add(proto)
    found = _find_in_pool(pool, service, method)
    if found is None:  # pragma: no cover - the server just said it has the service
        raise BenchError(f"{target} does not describe {service!r}")
    info = _info_from(found, "reflection")
    return info


def _collect_reflected(database: Any, proto: Any, seen: set[str], out: list[Any]) -> None:
    if proto.name in seen:
        return
    seen.add(proto.name)
    for dep in proto.dependency:
        _collect_reflected(database, database.FindFileByName(dep), seen, out)
    out.append(proto)


def build_request(info: MethodInfo, data: str | None, payload_size: int | None) -> bytes:
    """The serialized request: ``data`` (protobuf JSON) plus ``payload_size`` bytes in ``payload``."""
    request_class, _ = info.message_classes()
    request = request_class()
    if data:
        try:
            json_format.Parse(data, request)
        except json_format.ParseError as exc:
            raise BenchError(f"--data is not a valid {info.request_type} in JSON: {exc}") from None
    if payload_size is not None:
        field = request.DESCRIPTOR.fields_by_name.get("payload")
        if field is None or field.type != FieldDescriptor.TYPE_BYTES or field.is_repeated:
            raise BenchError(f"--payload-size needs a 'bytes payload' field, which {info.request_type} lacks")
        request.payload = bytes(payload_size)  # type: ignore[attr-defined]
    return request.SerializeToString()
