"""Resolvers by target scheme: register_resolver, lazy factories, and the built-in schemes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import rpcframe
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc
from rpcframe.balancing import resolver as resolver_module
from rpcframe.balancing.resolver import DNSResolver, ManualResolver, Resolver, StaticResolver, resolver_for
from rpcframe.errors import ConfigError
from tests.servicers import Backend


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test registers into a copy: schemes (and replaced built-ins) do not leak into other tests.
    monkeypatch.setattr(resolver_module, "_FACTORIES", dict(resolver_module._FACTORIES))


def test_a_registered_scheme_gets_the_target_and_the_refresh_period() -> None:
    calls: list[tuple[str, float]] = []

    def factory(target: str, refresh: float) -> Resolver:
        calls.append((target, refresh))
        return ManualResolver(["127.0.0.1:1"])

    rpcframe.register_resolver("Mem", factory)
    assert isinstance(resolver_for("mem://orders", dns_refresh=7.5), ManualResolver)
    assert isinstance(resolver_for("MEM://orders"), ManualResolver)  # schemes are case-insensitive
    assert calls == [("mem://orders", 7.5), ("MEM://orders", 30.0)]


def test_registering_again_replaces_the_factory_built_ins_too() -> None:
    manual = ManualResolver(["127.0.0.1:1"])
    rpcframe.register_resolver("dns", lambda target, refresh: manual)
    assert resolver_for("dns:///localhost:1") is manual


def test_a_lazy_factory_is_imported_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lazy_discovery_plugin.py").write_text(
        "from rpcframe.balancing.resolver import StaticResolver\n"
        "class Plugin:\n"
        "    @staticmethod\n"
        "    def build(target, refresh):\n"
        "        return StaticResolver([target.partition('://')[2]])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_discovery_plugin", raising=False)
    rpcframe.register_resolver("plug", "lazy_discovery_plugin:Plugin.build")
    assert "lazy_discovery_plugin" not in sys.modules
    resolved = resolver_for("plug://127.0.0.1:5")
    assert isinstance(resolved, StaticResolver)
    assert [e.address for e in resolved.endpoints] == ["127.0.0.1:5"]
    assert "lazy_discovery_plugin" in sys.modules


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_module_for_rpcframe:build", "cannot be loaded"),
        ("rpcframe.balancing.resolver:no_such_name", "cannot be loaded"),
        ("rpcframe.balancing.resolver:__doc__", "not callable"),
    ],
)
def test_a_lazy_factory_that_does_not_load_is_a_config_error(spec: str, match: str) -> None:
    rpcframe.register_resolver("broken", spec)
    with pytest.raises(ConfigError, match=match):
        resolver_for("broken://x")


@pytest.mark.parametrize("scheme", ["", "1abc", "a b", "a:b", "a/b"])
def test_a_scheme_must_be_a_uri_scheme(scheme: str) -> None:
    with pytest.raises(ConfigError, match="URI scheme"):
        rpcframe.register_resolver(scheme, lambda target, refresh: ManualResolver())


@pytest.mark.parametrize("factory", [None, 42, "no-colon"])
def test_a_factory_must_be_callable_or_a_module_attribute_string(factory: object) -> None:
    with pytest.raises(ConfigError, match="callable"):
        rpcframe.register_resolver("x", factory)  # type: ignore[arg-type]


def test_unknown_schemes_name_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown target scheme \(known: dns, etcd, static;"):
        resolver_for("xds:///svc")


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("dns://8.8.8.8/localhost:1", "authority is not supported"),
        ("dns://localhost:1", "authority is not supported"),
        ("static://h/a:1", "expected static:///"),
        ("static:///a:1,b://c", "expected static:///"),
    ],
)
def test_built_in_schemes_refuse_what_they_do_not_support(target: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolver_for(target)


@pytest.mark.parametrize(
    ("target", "addresses"),
    [
        ("a:1", ["a:1"]),
        ("a:1, b:2", ["a:1", "b:2"]),
        ("static:///a:1,b:2", ["a:1", "b:2"]),
        ("unix:///tmp/sock", ["unix:///tmp/sock"]),
        ("unix-abstract:name", ["unix-abstract:name"]),
    ],
)
def test_static_targets(target: str, addresses: Sequence[str]) -> None:
    resolved = resolver_for(target)
    assert isinstance(resolved, StaticResolver)
    assert [e.address for e in resolved.endpoints] == list(addresses)


def test_dns_scheme_is_case_insensitive() -> None:
    resolved = resolver_for("DNS:///localhost:50051", dns_refresh=3)
    assert isinstance(resolved, DNSResolver)
    assert (resolved.host, resolved.port, resolved.refresh) == ("localhost", 50051, 3)


def test_etcd_loads_only_for_an_etcd_target() -> None:
    code = (
        "import sys\n"
        "from rpcframe.balancing.resolver import resolver_for\n"
        "assert not [m for m in sys.modules if m.startswith('rpcframe.discovery')]\n"
        "resolver_for('127.0.0.1:1'); resolver_for('dns:///localhost:1')\n"
        "assert not [m for m in sys.modules if m.startswith('rpcframe.discovery')]\n"
        "r = resolver_for('etcd://127.0.0.1:2379/services/echo/')\n"
        "assert type(r).__name__ == 'EtcdResolver' and 'rpcframe.discovery.etcd_resolver' in sys.modules\n"
        "r.close()\n"
    )
    root = Path(rpcframe.__file__).parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def backend() -> Iterator[Backend]:
    started = Backend("registered")
    yield started
    started.stop()


def test_a_channel_resolves_a_registered_scheme(backend: Backend) -> None:
    seen: list[str] = []

    def factory(target: str, refresh: float) -> Resolver:
        seen.append(target)
        return ManualResolver([backend.address])

    rpcframe.register_resolver("registry-test", factory)
    with rpcframe.connect("registry-test://echo", rpcframe.ChannelConfig(default_timeout=5)) as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        assert stub.Echo(pb.EchoRequest(message="whoami")).message == "registered"
    assert seen == ["registry-test://echo"]
