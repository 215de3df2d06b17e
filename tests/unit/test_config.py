"""Config validation and the grpc options it produces."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

import rpcframe


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"default_timeout": 0}, "default_timeout"),
        ({"default_timeout": -1.0}, "default_timeout"),
        ({"max_send_message_length": 0}, "max_send_message_length"),
        ({"keepalive_time": 0}, "keepalive_time"),
        ({"metadata": (("Upper", "x"),)}, "metadata key"),
        ({"metadata": (("grpc-timeout", "1S"),)}, "metadata key"),
    ],
)
def test_channel_config_rejects(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(rpcframe.ConfigError, match=field):
        rpcframe.ChannelConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_workers": 0}, "max_workers"),
        ({"max_concurrent_rpcs": 0}, "max_concurrent_rpcs"),
        ({"grace_period": -1}, "grace_period"),
        ({"drain_delay": -0.1}, "drain_delay"),
        ({"max_receive_message_length": -5}, "max_receive_message_length"),
    ],
)
def test_server_config_rejects(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(rpcframe.ConfigError, match=field):
        rpcframe.ServerConfig(**kwargs)  # type: ignore[arg-type]


def test_configs_are_frozen() -> None:
    config = rpcframe.ChannelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.default_timeout = 3.0  # type: ignore[misc]
    assert dataclasses.replace(config, default_timeout=3.0).default_timeout == 3.0


def test_channel_options() -> None:
    options = dict(rpcframe.ChannelConfig(max_receive_message_length=-1, keepalive_time=30).channel_options())
    assert options["grpc.max_receive_message_length"] == -1
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.primary_user_agent"].startswith("rpcframe")


def test_server_options_and_exception_mapping() -> None:
    config = rpcframe.ServerConfig(grpc_options=(("grpc.so_reuseport", 1),))
    options = config.server_options()
    # Extra options come last so they win.
    assert options[-1] == ("grpc.so_reuseport", 1)
    assert config.status_for(FileNotFoundError("x")) is grpc.StatusCode.NOT_FOUND
    assert config.status_for(ValueError("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert config.status_for(KeyError("x")) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_concurrent_streams": 0}, "max_concurrent_streams"),
        ({"max_connections": 0}, "max_connections"),
        ({"stream_write_timeout": 0}, "stream_write_timeout"),
        ({"stream_read_timeout": -1.0}, "stream_read_timeout"),
        ({"max_connection_idle": 0}, "max_connection_idle"),
        ({"max_connection_age": -5}, "max_connection_age"),
        ({"max_connection_age_grace": 0}, "max_connection_age_grace"),
        ({"handshake_timeout": 0}, "handshake_timeout"),
        ({"max_metadata_size": 100}, "max_metadata_size"),
    ],
)
def test_server_config_rejects_bad_limits(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(rpcframe.ConfigError, match=field):
        rpcframe.ServerConfig(**kwargs)  # type: ignore[arg-type]


def test_server_limits_default_to_envoy_edge_values() -> None:
    config = rpcframe.ServerConfig()
    options = dict(config.server_options())
    assert options["grpc.max_concurrent_streams"] == 100  # asyncio: Envoy's edge value
    # Thread-pool server: one connection holds at most half of the (larger) pool.
    assert config.max_workers == 64
    assert dict(config.server_options(threads=True))["grpc.max_concurrent_streams"] == 32
    # grpc's overload protection refuses calls of clients that keep to the limit.
    assert options["grpc.http.overload_protection"] == 0
    assert options["grpc.max_metadata_size"] == options["grpc.absolute_max_metadata_size"] == 16 * 1024
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.max_connection_idle_ms"] == 3_600_000
    assert "grpc.max_connection_age_ms" not in options
    assert "grpc.max_allowed_incoming_connections" not in options
    assert (config.stream_write_timeout, config.stream_read_timeout) == (30.0, 300.0)


def test_server_limits_map_to_grpc_options() -> None:
    config = rpcframe.ServerConfig(
        max_workers=8,
        max_concurrent_streams=50,
        max_connection_idle=None,
        max_connection_age=1e9,  # longer than grpc's int milliseconds: clamped, not overflowed
        max_connection_age_grace=2.5,
        max_connections=300,
        grpc_options=(("grpc.max_concurrent_streams", 7),),
    )
    options = config.server_options(threads=True)
    as_dict = dict(options)
    assert as_dict["grpc.max_connection_age_ms"] == 2**31 - 1
    assert as_dict["grpc.max_connection_age_grace_ms"] == 2500
    assert as_dict["grpc.max_allowed_incoming_connections"] == 300
    assert "grpc.max_connection_idle_ms" not in as_dict
    assert config.concurrent_streams(threads=True) == 50  # the explicit limit wins over the thread-pool rule
    # A raw grpc option replaces rpcframe's: grpc would keep the first of two equal keys.
    assert [v for k, v in options if k == "grpc.max_concurrent_streams"] == [7]
    assert rpcframe.ServerConfig(max_workers=1).concurrent_streams(threads=True) == 1


def test_channel_grpc_options_replace_rpcframes_own() -> None:
    # grpc keeps the FIRST of two equal keys: an appended override would be ignored.
    options = rpcframe.ChannelConfig(grpc_options=(("grpc.use_local_subchannel_pool", 0),)).channel_options()
    assert [value for key, value in options if key == "grpc.use_local_subchannel_pool"] == [0]


def test_accept_queue_sets_grpcs_pending_call_limits() -> None:
    assert "grpc.server.max_pending_requests" not in dict(rpcframe.ServerConfig().server_options())
    config = rpcframe.ServerConfig(overload=rpcframe.OverloadConfig(accept_queue=16))
    for threads in (False, True):
        options = dict(config.server_options(threads=threads))
        assert options["grpc.server.max_pending_requests"] == 16
        assert options["grpc.server.max_pending_requests_hard_limit"] == 32
    off = rpcframe.ServerConfig(overload=None)
    assert "grpc.server.max_pending_requests" not in dict(off.server_options())
    with pytest.raises(rpcframe.ConfigError, match="accept_queue"):
        rpcframe.OverloadConfig(accept_queue=0)
