"""Which exporters the standard OTEL_* variables ask for (the pure part of rpcframe.otel.from_environment)."""

from __future__ import annotations

import pytest

from rpcframe.errors import ConfigError
from rpcframe.otel import _wanted, from_environment


@pytest.mark.parametrize(
    ("environ", "traces", "metrics"),
    [
        ({}, "none", "none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, "otlp", "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, "otlp", "none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_METRICS_EXPORTER": "none"}, "otlp", "none"),
        ({"OTEL_TRACES_EXPORTER": " Console "}, "console", "none"),
    ],
)
def test_the_environment_picks_each_signals_exporter(environ: dict[str, str], traces: str, metrics: str) -> None:
    assert (_wanted(environ, "traces"), _wanted(environ, "metrics")) == (traces, metrics)


def test_nothing_asked_or_sdk_disabled_means_no_telemetry() -> None:
    assert from_environment({}) is None
    assert from_environment({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin': rpcframe supports otlp, console, none"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
         "rpcframe exports OTLP over grpc only"),
    ],
)  # fmt: skip
def test_unsupported_exporters_are_refused_clearly(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_environment(environ)
