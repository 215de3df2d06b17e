"""The access log: one JSON line per call on both sides, never a credential."""

from __future__ import annotations

import json
import logging

import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.accesslog import AccessLog
from rpcframe.security import ApiKeys, AuthConfig, StaticToken
from tests.cli import ServeProcess
from tests.servicers import ScriptedEcho

KEY = "s3cret-key-that-must-not-be-logged"


def test_one_json_line_per_call_without_the_key(caplog: pytest.LogCaptureFixture) -> None:
    auth = AuthConfig(api_keys=ApiKeys.from_plain({"ci-bot": KEY}), mtls=False)
    server = rpcframe.Server(rpcframe.ServerConfig(auth=auth, observers=(AccessLog(),)))
    server.add(ScriptedEcho("s"))
    port = server.bind("127.0.0.1:0")
    server.start()
    config = rpcframe.ChannelConfig(token=StaticToken(KEY, key_name="x-api-key", scheme=""), observers=(AccessLog(),))
    caplog.set_level(logging.INFO, logger="rpcframe.access")
    try:
        with rpcframe.connect(f"127.0.0.1:{port}", config) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            assert stub.Echo(pb.EchoRequest(message="hi")).message == "hi"
            with pytest.raises(rpcframe.NotFound):
                stub.Echo(pb.EchoRequest(message="raise:NotFound:gone"))
    finally:
        server.stop(0)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "rpcframe.access"]
    server_lines = [line for line in lines if line["side"] == "server"]
    client_lines = [line for line in lines if line["side"] == "client"]
    assert [line["status"] for line in server_lines] == ["OK", "NOT_FOUND"]
    assert [line["status"] for line in client_lines] == ["OK", "NOT_FOUND"]
    assert {(line["principal"], line["auth"]) for line in server_lines} == {("ci-bot", "api_key")}
    assert all(line["peer"].startswith("ipv4:127.0.0.1:") for line in server_lines)
    assert all(line["attempts"] == 1 and line["target"] == f"127.0.0.1:{port}" for line in client_lines)
    assert all(line["method"] == "/rpcframe.echo.v1.EchoService/Echo" and line["latency_ms"] >= 0 for line in lines)
    assert not any(KEY in r.getMessage() for r in caplog.records)


def test_serve_access_log_flag() -> None:
    serve = ServeProcess("tests.servicers:tagged", "--bind", "127.0.0.1:0", "--access-log")
    try:
        with rpcframe.connect(serve.target) as channel:
            assert channel.stub(echo_pb2_grpc.EchoServiceStub).Echo(pb.EchoRequest(message="hi")).message == "hi"
        serve.proc.terminate()
        assert serve.proc.wait(20) == 0
    finally:
        stderr = serve.kill()  # stops it if still running; what it wrote to stderr
    marker = "rpcframe.access: "
    lines = [json.loads(line.split(marker, 1)[1]) for line in stderr.splitlines() if marker in line]
    assert [(line["side"], line["method"], line["status"]) for line in lines] == [
        ("server", "/rpcframe.echo.v1.EchoService/Echo", "OK")
    ]
