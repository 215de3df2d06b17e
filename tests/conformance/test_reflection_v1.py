"""Reflection is served under grpc.reflection.v1 (what grpcurl and buf ask for first) and v1alpha."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as wire  # v1 messages are byte-identical

import rpcframe
from examples.echo import EchoServicer
from tests.conftest import Running, run_process

BUF = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "buf"
V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
EXPECTED_SERVICES = {
    "rpcframe.echo.v1.EchoService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def _buf_v1(target: str, *args: str) -> list[str]:
    """buf curl limited to reflection v1: no silent fallback to v1alpha."""
    if not BUF.exists() and shutil.which("buf") is None:
        pytest.fail("buf CLI missing: run `make setup` (npm ci installs @bufbuild/buf)")
    buf = str(BUF) if BUF.exists() else "buf"
    return [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1",
            *args, f"http://{target}"]  # fmt: skip


def _reflect(target: str, method: str, *requests: wire.ServerReflectionRequest) -> list[wire.ServerReflectionResponse]:
    """Raw grpcio reflection call on ``method`` (no rpcframe client involved)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            method,
            request_serializer=wire.ServerReflectionRequest.SerializeToString,
            response_deserializer=wire.ServerReflectionResponse.FromString,
        )
        return list(call(iter(requests), timeout=10))


@pytest.mark.interop
def test_buf_lists_services_over_v1_sync(sync_server: Running) -> None:
    result = subprocess.run(_buf_v1(sync_server.target, "--list-services"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == EXPECTED_SERVICES


@pytest.mark.interop
async def test_buf_lists_services_and_calls_over_v1_aio(aio_server: Running) -> None:
    code, out, err = await run_process(_buf_v1(aio_server.target, "--list-services"))
    assert code == 0, err
    assert set(out.split()) == EXPECTED_SERVICES
    # A call needs the method's descriptors, fetched by file_containing_symbol over v1.
    args = _buf_v1(aio_server.target, "-d", '{"message": "v1"}')
    args[-1] += "/rpcframe.echo.v1.EchoService/Echo"
    code, out, err = await run_process(args)
    assert code == 0, err
    assert '"message": "v1"' in out


def test_raw_v1_list_services_sync(sync_server: Running) -> None:
    (response,) = _reflect(sync_server.target, V1, wire.ServerReflectionRequest(list_services=""))
    assert {s.name for s in response.list_services_response.service} == EXPECTED_SERVICES


async def test_raw_v1_list_services_aio(aio_server: Running) -> None:
    import grpc.aio

    async with grpc.aio.insecure_channel(aio_server.target) as channel:
        call = channel.stream_stream(
            V1,
            request_serializer=wire.ServerReflectionRequest.SerializeToString,
            response_deserializer=wire.ServerReflectionResponse.FromString,
        )
        responses = [r async for r in call(iter([wire.ServerReflectionRequest(list_services="")]), timeout=10)]
    assert len(responses) == 1
    assert {s.name for s in responses[0].list_services_response.service} == EXPECTED_SERVICES


def test_every_listed_service_resolves_over_v1(sync_server: Running) -> None:
    """grpcurl's `describe` walks every listed service: the v1 service itself must resolve too."""
    requests = [wire.ServerReflectionRequest(file_containing_symbol=name) for name in sorted(EXPECTED_SERVICES)]
    responses = _reflect(sync_server.target, V1, *requests)
    assert len(responses) == len(requests)
    for request, response in zip(requests, responses, strict=True):
        assert response.WhichOneof("message_response") == "file_descriptor_response", request
        blobs = response.file_descriptor_response.file_descriptor_proto
        files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in blobs]
        package, _, service = request.file_containing_symbol.rpartition(".")
        assert any(f.package == package and service in {s.name for s in f.service} for f in files)


def test_v1_and_v1alpha_answer_alike(sync_server: Running) -> None:
    request = wire.ServerReflectionRequest(file_containing_symbol="rpcframe.echo.v1.EchoService")
    (v1,) = _reflect(sync_server.target, V1, request)
    (alpha,) = _reflect(sync_server.target, V1.replace(".v1.", ".v1alpha."), request)
    assert v1.file_descriptor_response.file_descriptor_proto
    assert v1 == alpha


def test_no_reflection_means_neither_version() -> None:
    server = rpcframe.Server(rpcframe.ServerConfig(reflection=False))
    server.add(EchoServicer())
    port = server.bind("127.0.0.1:0")
    with server:
        for method in (V1, V1.replace(".v1.", ".v1alpha.")):
            with pytest.raises(grpc.RpcError) as caught:
                _reflect(f"127.0.0.1:{port}", method, wire.ServerReflectionRequest(list_services=""))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
