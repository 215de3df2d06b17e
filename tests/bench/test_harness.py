"""Short real runs of ``rpcframe bench`` against rpcframe and raw grpcio servers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from rpcframe.cli import _bench

from .conftest import Served

REPO = Path(__file__).resolve().parents[2]
BENCH = "rpcframe.bench.v1.BenchService"


def bench(tmp_path: Path, target: str, method: str, *args: str, exit_code: int = 0) -> dict[str, Any]:
    """Run the CLI in this process; return its JSON document (written also when every call failed)."""
    out = tmp_path / "result.json"
    code = _bench.main([target, "--method", f"{BENCH}/{method}", "--json", str(out), "--no-progress", *args])
    assert code == exit_code
    doc: dict[str, Any] = json.loads(out.read_text())
    # Every call ends with one status, and lands in one second of the timeline.
    assert sum(doc["status"].values()) == doc["summary"]["calls"]
    assert sum(entry["calls"] for entry in doc["timeline"]) == doc["summary"]["calls"]
    assert doc["summary"]["ok"] + doc["summary"]["errors"] == doc["summary"]["calls"]
    return doc


@pytest.mark.parametrize("client", ["rpcframe", "raw"])
def test_unary_against_rpcframe_server(rpcframe_server: Served, tmp_path: Path, client: str) -> None:
    doc = bench(tmp_path, rpcframe_server.target, "Unary", "-n", "50", "-c", "4", "--mode", "sync",
                "--client", client, "--payload-size", "64", "--data", '{"responseSize": 64}')  # fmt: skip
    assert doc["summary"]["calls"] == 50
    assert doc["status"] == {"OK": 50}
    assert doc["latency_us"]["count"] == 50
    assert doc["config"]["client"] == client
    assert doc["config"]["descriptors"] == "stubs"
    assert doc["config"]["request_bytes"] > 64
    assert rpcframe_server.servicer.counts["Unary"] == 50


def test_warmup_calls_are_not_recorded(rpcframe_server: Served, tmp_path: Path) -> None:
    doc = bench(tmp_path, rpcframe_server.target, "Unary", "-n", "20", "--warmup", "100ms", "--mode", "sync")
    assert doc["summary"]["calls"] == 20
    assert rpcframe_server.servicer.counts["Unary"] > 20  # the warmup's calls reached the server too


@pytest.mark.parametrize("client", ["rpcframe", "raw"])
def test_callers_spread_over_connections(rpcframe_server: Served, tmp_path: Path, client: str) -> None:
    doc = bench(tmp_path, rpcframe_server.target, "Unary", "-n", "40", "-c", "4", "--connections", "2",
                "--mode", "sync", "--client", client)  # fmt: skip
    assert doc["config"]["connections"] == 2
    assert doc["status"] == {"OK": 40}


def test_raw_grpcio_server_through_reflection(raw_server: Served, tmp_path: Path) -> None:
    doc = bench(tmp_path, raw_server.target, "Unary", "-n", "50", "--reflection", "--mode", "sync", "--client", "raw")
    assert doc["config"]["descriptors"] == "reflection"
    assert doc["status"] == {"OK": 50}
    assert raw_server.servicer.counts["Unary"] == 50


def test_failures_are_counted_by_status(rpcframe_server: Served, tmp_path: Path) -> None:
    doc = bench(tmp_path, rpcframe_server.target, "Unary", "-n", "20", "--mode", "sync", "--data", '{"failCode": 5}',
                exit_code=1)  # every call failed  # fmt: skip
    assert doc["status"] == {"NOT_FOUND": 20}
    assert doc["summary"]["ok"] == 0
    assert "fail_code=5" in doc["errors"]["NOT_FOUND"]
    assert doc["latency_us"]["count"] == 0


def test_server_stream_counts_messages(rpcframe_server: Served, tmp_path: Path) -> None:
    doc = bench(tmp_path, rpcframe_server.target, "ServerStream", "-n", "10", "--mode", "sync",
                "--data", '{"count": 5, "responseSize": 1024}')  # fmt: skip
    assert doc["summary"]["calls"] == 10
    assert doc["summary"]["messages"] == 50
    assert doc["config"]["kind"] == "server-stream"


def test_bidi_ping_pong_round_trips(raw_server: Served, tmp_path: Path) -> None:
    doc = bench(tmp_path, raw_server.target, "PingPong", "-n", "30", "-c", "2", "--mode", "sync", "--client", "raw")
    assert doc["status"] == {"OK": 30}
    assert doc["summary"]["messages"] == 30
    assert raw_server.servicer.counts["PingPong"] == 30


def test_open_loop_sends_exactly_the_schedule(rpcframe_server: Served, tmp_path: Path) -> None:
    # 200/s for 0.25 s is 50 sends, however fast or slow the server is.
    doc = bench(tmp_path, rpcframe_server.target, "Unary", "--rps", "200", "-z", "250ms", "--mode", "sync")
    assert doc["config"]["load"] == "open"
    assert doc["summary"]["calls"] == 50
    assert rpcframe_server.servicer.counts["Unary"] == 50


def test_aio_load_generators_in_two_processes(rpcframe_server: Served, tmp_path: Path) -> None:
    doc = bench(tmp_path, rpcframe_server.target, "Unary", "-n", "40", "-c", "4", "--procs", "2", "--mode", "aio",
                "--loop", "asyncio")  # fmt: skip
    assert doc["config"]["procs"] == 2
    assert doc["status"] == {"OK": 40}
    assert rpcframe_server.servicer.counts["Unary"] == 40
    assert doc["client_cpu"]["user_s"] >= 0  # os.times ticks in 10 ms: a short run may show 0


def _start_example(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "examples.bench_server", *args, "--bind", "127.0.0.1:0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(30)
    match = re.fullmatch(r"serving on (\S+:\d+)\n", lines[0]) if lines else None
    if match is None:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"example server did not start: {lines} {err}")
    return proc, match.group(1)


@pytest.mark.parametrize("args", [("--raw", "--aio"), ("--rpcframe", "--sync")], ids=["raw-aio", "rpcframe-sync"])
def test_example_server_process(args: tuple[str, ...], tmp_path: Path) -> None:
    proc, target = _start_example(*args)
    try:
        doc = bench(tmp_path, target, "Unary", "-n", "20", "--mode", "sync", "--client", "raw")
        assert doc["status"] == {"OK": 20}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err
