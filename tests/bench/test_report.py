"""The JSON document's schema, the summary table and the plots, on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import rpcframe
from rpcframe.bench import LoadSpec, build_request, resolve_method
from rpcframe.bench.histogram import Partial, Recorder, merge
from rpcframe.bench.plot import write_plots
from rpcframe.bench.report import SCHEMA_VERSION, summary_table, write_json
from rpcframe.bench.runner import BenchResult

METHOD = "rpcframe.bench.v1.BenchService/ServerStream"

# key -> type (or tuple of types) of every key the docstring promises.
SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "tool": str,
    "versions": {"rpcframe": str, "grpcio": str, "python": str},
    "started_at": str,
    "config": {
        "target": str, "method": str, "kind": str, "descriptors": str, "mode": str, "client": str,
        "loop": (str, type(None)), "load": str, "concurrency": int, "rps": (float, int, type(None)),
        "duration_s": (float, int, type(None)), "total": (int, type(None)), "warmup_s": (float, int),
        "connections": int, "procs": int, "request_bytes": int, "stream_messages": int,
        "call_timeout_s": (float, int),
    },
    "summary": {"calls": int, "ok": int, "errors": int, "messages": int, "elapsed_s": (float, int),
                "qps": (float, int), "messages_per_s": (float, int), "late_sends": int},
    "latency_us": {"count": int, "min": int, "mean": (float, int), "p50": int, "p90": int, "p99": int,
                   "p99.9": int, "max": int},
    "status": dict,
    "errors": dict,
    "client_cpu": {"user_s": (float, int), "system_s": (float, int), "us_per_call": (float, int),
                   "us_per_message": (float, int), "cores": (float, int)},
    "timeline": list,
    "percentile_curve": list,
    "histogram": str,
}  # fmt: skip
TIMELINE_ENTRY = {"second": int, "width_s": (float, int), "calls": int, "ok": int, "errors": int, "messages": int,
                  "p50_us": int, "p99_us": int}  # fmt: skip


def _check(doc: dict[str, Any], schema: dict[str, Any], where: str = "") -> None:
    assert set(doc) == set(schema), f"{where}: keys differ"
    for key, expected in schema.items():
        if isinstance(expected, dict):
            assert isinstance(doc[key], dict), f"{where}{key}"
            _check(doc[key], expected, f"{where}{key}.")
        else:
            assert isinstance(doc[key], expected), f"{where}{key}: {type(doc[key]).__name__}"


@pytest.fixture
def result() -> BenchResult:
    method = resolve_method(METHOD, "unused:1")  # from the generated stubs, no server involved
    spec = LoadSpec("127.0.0.1:9", method, build_request(method, '{"count": 3}', 16), total=9)
    rec = Recorder(t0=0.0)
    for i in range(8):
        rec.success(i * 0.2, i * 0.2 + 0.001 * (i + 1), 3)
    rec.failure(1.7, rpcframe.Unavailable("gone"))
    merged = merge([Partial.from_recorders([rec], 1.8, (0.3, 0.1))])
    return BenchResult(spec, 1, merged, 1_700_000_000.0)


def test_document_follows_the_schema(result: BenchResult, tmp_path: Path) -> None:
    path = write_json(result, tmp_path / "out.json")
    doc = json.loads(path.read_text())
    _check(doc, SCHEMA)
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    for entry in doc["timeline"]:
        _check(entry, TIMELINE_ENTRY, "timeline.")
    assert doc["config"]["kind"] == "server-stream"
    assert doc["config"]["descriptors"] == "stubs"
    assert doc["config"]["request_bytes"] == len(result.spec.request)
    expected = {"calls": 9, "ok": 8, "errors": 1, "messages": 24, "elapsed_s": 1.8, "qps": 5.0, "late_sends": 0}
    assert doc["summary"] == {**expected, "messages_per_s": pytest.approx(13.333, abs=1e-3)}
    assert doc["status"] == {"OK": 8, "UNAVAILABLE": 1}
    assert sum(doc["status"].values()) == doc["summary"]["calls"]
    assert sum(e["calls"] for e in doc["timeline"]) == doc["summary"]["calls"]
    assert doc["errors"] == {"UNAVAILABLE": "gone"}
    assert doc["latency_us"]["count"] == 8
    assert doc["latency_us"]["min"] == 1000
    assert doc["latency_us"]["max"] == pytest.approx(8000, rel=1e-3)  # 3 significant digits
    assert doc["client_cpu"]["us_per_call"] == pytest.approx(0.4e6 / 9, abs=0.01)
    assert doc["percentile_curve"][-1] == [100.0, doc["latency_us"]["max"]]
    assert doc["started_at"].startswith("2023-11-14T22:13:20")


def test_summary_table_mentions_the_numbers(result: BenchResult) -> None:
    console = Console(record=True, width=120)
    console.print(summary_table(result))
    text = console.export_text()
    assert "9 in 1.80 s (8 OK, 1 failed)" in text
    assert "UNAVAILABLE 1" in text
    assert "p99.9" in text


def test_plots_are_png_files(result: BenchResult, tmp_path: Path) -> None:
    paths = write_plots(result, tmp_path / "plots" / "run")
    assert [p.name for p in paths] == ["run-latency.png", "run-timeline.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
