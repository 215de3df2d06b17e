"""rpcframe talks to peers it did not build: raw grpcio and the buf CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import rpcframe
import rpcframe.aio
from examples.echo import EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.conftest import Running, run_process

BUF = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "buf"


@pytest.fixture
def raw_server() -> Iterator[str]:
    """A plain grpcio server, no rpcframe involved."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_raw_grpc_client_calls_rpcframe_server(sync_server: Running) -> None:
    with grpc.insecure_channel(sync_server.target) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        assert stub.Echo(pb.EchoRequest(message="raw")).message == "raw"
        assert [r.index for r in stub.Expand(pb.ExpandRequest(message="m", count=3))] == [0, 1, 2]
        assert stub.Collect(iter([pb.EchoRequest(message="a"), pb.EchoRequest(message="b")])).message == "ab"
        assert [r.message for r in stub.Chat(iter([pb.EchoRequest(message="x")]))] == ["x"]
        with pytest.raises(grpc.RpcError) as info:
            stub.Echo(pb.EchoRequest(message="raise:NotFound:missing"))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "missing"


def test_rpcframe_client_calls_raw_grpc_server(raw_server: str) -> None:
    with rpcframe.connect(raw_server) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(pb.EchoRequest(message="hi")).message == "hi"
        assert [r.index for r in stub.Expand(pb.ExpandRequest(message="m", count=2))] == [0, 1]
        assert stub.Collect(iter([pb.EchoRequest(message="c")])).count == 1
        assert [r.message for r in stub.Chat(iter([pb.EchoRequest(message="y")]))] == ["y"]


async def test_rpcframe_aio_client_calls_raw_grpc_server(raw_server: str) -> None:
    async with rpcframe.aio.connect(raw_server) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert (await stub.Echo(pb.EchoRequest(message="hi"))).message == "hi"
        assert [r.index async for r in stub.Expand(pb.ExpandRequest(message="m", count=2))] == [0, 1]


def _buf_args(target: str, method: str, data: str) -> list[str]:
    if not BUF.exists() and shutil.which("buf") is None:
        pytest.fail("buf CLI missing: run `make setup` (npm ci installs @bufbuild/buf)")
    buf = str(BUF) if BUF.exists() else "buf"
    return [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", data, f"http://{target}/{method}"]


def _buf_curl(target: str, method: str, data: str) -> subprocess.CompletedProcess[str]:
    args = _buf_args(target, method, data)
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


async def _abuf_curl(target: str, method: str, data: str) -> tuple[int, str, str]:
    """buf curl without blocking the event loop the asyncio server runs on."""
    return await run_process(_buf_args(target, method, data))


@pytest.mark.interop
def test_buf_curl_calls_sync_server_through_reflection(sync_server: Running) -> None:
    result = _buf_curl(sync_server.target, "rpcframe.echo.v1.EchoService/Echo", '{"message": "from buf"}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"message": "from buf"}


@pytest.mark.interop
async def test_buf_curl_server_stream_and_error_aio(aio_server: Running) -> None:
    code, out, err = await _abuf_curl(
        aio_server.target, "rpcframe.echo.v1.EchoService/Expand", '{"message": "s", "count": 2}'
    )
    assert code == 0, err
    # buf prints one JSON document per streamed message.
    docs = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert docs == [{"message": "s"}, {"message": "s", "index": 1}]
    code, _, err = await _abuf_curl(
        aio_server.target, "rpcframe.echo.v1.EchoService/Echo", '{"message": "raise:NotFound:nope"}'
    )
    assert code != 0
    assert "not_found" in err.lower().replace(" ", "_")


@pytest.mark.interop
def test_buf_curl_health_check(sync_server: Running) -> None:
    result = _buf_curl(sync_server.target, "grpc.health.v1.Health/Check", "{}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


@pytest.mark.interop
def test_reflection_can_be_turned_off() -> None:
    server = rpcframe.Server(rpcframe.ServerConfig(reflection=False))
    server.add(EchoServicer())
    port = server.bind("127.0.0.1:0")
    with server, rpcframe.connect(f"127.0.0.1:{port}") as channel:
        result = _buf_curl(f"127.0.0.1:{port}", "rpcframe.echo.v1.EchoService/Echo", '{"message": "x"}')
        reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(rpcframe.Unimplemented):
            list(reflect(iter([b""])))
    assert result.returncode != 0
    assert "failed to find service" in result.stderr
