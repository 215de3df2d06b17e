"""``rpcframe serve --metrics-port``: A66 metrics at /metrics, scraped by a real Prometheus."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from tests.cli import ServeProcess
from tests.conftest import wait_until

CALLS = 3
ECHO_LABEL = 'grpc_method="rpcframe.echo.v1.EchoService/Echo"'


@pytest.fixture
def served() -> Iterator[tuple[ServeProcess, str]]:
    serve = ServeProcess("tests.servicers:tagged", "--bind", "127.0.0.1:0", "--metrics-port", "0")
    try:
        assert serve.proc.stdout is not None
        line = serve.proc.stdout.readline()
        assert line.startswith("metrics on 127.0.0.1:"), line
        with rpcframe.connect(serve.target) as channel:
            stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
            for _ in range(CALLS):
                stub.Echo(pb.EchoRequest(message="hi"))
        yield serve, line.split()[-1]
    finally:
        serve.kill()


def _scrape(metrics: str) -> str:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_metrics_endpoint_counts_calls_by_a66_names(served: tuple[ServeProcess, str]) -> None:
    text = _scrape(served[1])
    assert f"grpc_server_call_started_total{{{ECHO_LABEL}}} {CALLS}.0" in text
    assert f'grpc_server_call_duration_seconds_count{{{ECHO_LABEL},grpc_status="OK"}} {CALLS}.0' in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _query(port: int, expression: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as response:
        return list(json.loads(response.read())["data"]["result"])


def test_a_real_prometheus_scrapes_the_call_counts(served: tuple[ServeProcess, str], tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (make setup installs Debian's package when it can)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n"
        f"  - job_name: rpcframe\n    static_configs:\n      - targets: ['{served[1]}']\n"
    )
    port = _free_port()
    prometheus = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    found: list[dict[str, object]] = []

    def scraped() -> bool:
        try:
            found[:] = _query(port, f"grpc_server_call_started_total{{{ECHO_LABEL}}}")
        except OSError:
            return False  # not listening yet
        return bool(found)

    try:
        wait_until(scraped, timeout=30, interval=0.2)  # Prometheus scrapes every 1 s
        assert float(found[0]["value"][1]) == CALLS  # type: ignore[index]
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(10)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()
