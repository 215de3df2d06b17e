"""Server reflection under both ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection (1.85) ships only the v1alpha service, while current tools
(grpcurl, buf curl) ask for v1 first. The v1 protocol is the v1alpha one with
the package renamed: every message and field number is the same, so the
v1alpha servicer and message classes answer v1 requests byte for byte. What is
missing is the v1 file in the descriptor pool, which a client needs when it
describes every listed service; it is derived here from the v1alpha file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc.experimental import aio as grpc_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["SERVICE_NAMES", "V1_SERVICE_NAME", "enable_reflection"]

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, reflection.SERVICE_NAME)
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PREFIX = ".grpc.reflection.v1alpha."


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection file: v1alpha's, with its package and type references renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.options.Clear()  # v1alpha's are `deprecated` and point at v1alpha packages
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_package = "io.grpc.reflection.v1"

    def rename(type_name: str) -> str:
        if type_name.startswith(_V1ALPHA_PREFIX):
            return ".grpc.reflection.v1." + type_name[len(_V1ALPHA_PREFIX) :]
        return type_name

    for message in proto.message_type:  # v1alpha has no nested types to walk
        for field in message.field:
            if field.HasField("type_name"):  # assigning "" would mark a scalar as typed
                field.type_name = rename(field.type_name)
    for method in proto.service[0].method:
        method.input_type, method.output_type = rename(method.input_type), rename(method.output_type)
    return proto


def _ensure_v1_descriptors() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)  # already there (a later grpcio-reflection, or an earlier server)
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())


def enable_reflection(service_names: Sequence[str], server: Any) -> None:
    """Serve reflection over ``service_names`` under both v1 and v1alpha on ``server``.

    ``server`` is a ``grpc.Server`` or a ``grpc.aio.Server``; one servicer
    answers both services.
    """
    _ensure_v1_descriptors()
    if isinstance(server, grpc_aio.Server):
        servicer: Any = reflection.aio.ReflectionServicer(service_names)
    else:
        servicer = reflection.ReflectionServicer(service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(V1_SERVICE_NAME, handlers)
