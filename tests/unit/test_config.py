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
