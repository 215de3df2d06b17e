"""etcd registry values, targets and key ranges (pure: no etcd, no sockets)."""

from __future__ import annotations

import logging

import pytest

from rpcframe.balancing.endpoint import Endpoint
from rpcframe.balancing.resolver import resolver_for
from rpcframe.discovery.etcd_gateway import endpoint_from_value, endpoint_value, prefix_range_end
from rpcframe.discovery.etcd_resolver import EtcdResolver
from rpcframe.errors import ConfigError


def test_json_value_with_weight_zone_and_metadata() -> None:
    value = b'{"address": "10.0.0.1:50051", "weight": 3, "metadata": {"zone": "a", "rack": 7}}'
    assert endpoint_from_value(value, "/services/echo/a") == Endpoint(
        "10.0.0.1:50051", weight=3, zone="a", metadata=(("rack", "7"), ("zone", "a"))
    )


def test_json_value_defaults_and_explicit_zone() -> None:
    assert endpoint_from_value('{"address": "h:1"}') == Endpoint("h:1")
    assert endpoint_from_value('{"address": "h:1", "zone": "b", "metadata": {"zone": "a"}}') == Endpoint(
        "h:1", zone="b", metadata=(("zone", "a"),)
    )


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (b"10.0.0.2:50051", "10.0.0.2:50051"),
        ("  backend.internal:443\n", "backend.internal:443"),
        ('"[::1]:50051"', "[::1]:50051"),  # a JSON string
        (b"unix:/run/echo.sock", "unix:/run/echo.sock"),
    ],
)
def test_bare_address_values(value: bytes | str, address: str) -> None:
    assert endpoint_from_value(value) == Endpoint(address)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not an address",
        b"host:port",
        b"host:0",
        b"host:70000",
        b"a:1,b:2",
        b"{broken json",
        b"[1, 2]",
        b'{"weight": 2}',
        b'{"address": 5}',
        b'{"address": "h:1", "weight": 0}',
        b'{"address": "h:1", "weight": "2"}',
        b'{"address": "h:1", "weight": true}',
        b'{"address": "h:1", "metadata": ["zone"]}',
        b'{"address": "h:1", "metadata": {"zone": {"nested": 1}}}',
        b'{"address": "h:1", "zone": 3}',
        b"\xff\xfe",
    ],
)
def test_bad_values_are_ignored_with_a_log_line(value: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rpcframe.discovery"):
        assert endpoint_from_value(value, "/services/echo/bad") is None
    assert len(caplog.records) == 1
    assert "/services/echo/bad" in caplog.records[0].getMessage()


def test_endpoint_value_round_trips() -> None:
    endpoint = Endpoint("10.0.0.1:50051", weight=2, zone="a", metadata=(("zone", "a"),))
    assert endpoint_from_value(endpoint_value(endpoint)) == endpoint
    assert endpoint_from_value(endpoint_value("h:1")) == Endpoint("h:1")
    assert endpoint_from_value(endpoint_value({"address": "h:1", "weight": 4})) == Endpoint("h:1", weight=4)
    with pytest.raises(ConfigError):
        endpoint_value({"address": "nope"})


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/services/echo/") == b"/services/echo0"
    assert prefix_range_end(b"a\xff\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\0"


def test_etcd_targets_map_to_a_resolver_without_connecting() -> None:
    resolver = resolver_for("etcd://10.0.0.5:2379,10.0.0.6:2379/services/echo/")
    assert isinstance(resolver, EtcdResolver)
    assert resolver.prefix == "/services/echo/"
    assert "10.0.0.5:2379" in repr(resolver)
    default = EtcdResolver.from_target("etcd:///services/echo/")
    assert "127.0.0.1:2379" in repr(default)
    assert default.current is None
    assert not default.connected
    default.close()  # never started: nothing to stop


@pytest.mark.parametrize(
    "target", ["etcd://127.0.0.1:2379", "etcd://127.0.0.1:2379/", "etcd://h:x/p/", "etcd://ftp://h/p/"]
)
def test_bad_etcd_targets(target: str) -> None:
    with pytest.raises(ConfigError):
        resolver_for(target)


def test_resolver_needs_a_prefix() -> None:
    with pytest.raises(ConfigError, match="prefix"):
        EtcdResolver("127.0.0.1:2379")
