"""A real nats-server -js for the events tests; they skip, saying why, where it is not installed."""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rpcframe.codegen import generate
from rpcframe.events import Events
from tests.events.natsserver import NatsServer, nats_server_binary

_names = itertools.count()


@pytest.fixture(scope="session")
def nats_binary() -> str:
    """The nats-server binary, or skip."""
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not installed (make system installs it with apt-get as root)")
    return binary


@pytest.fixture(scope="session")
def nats(nats_binary: str) -> Iterator[NatsServer]:
    """One nats-server shared by the tests that do not restart it (each uses its own topics)."""
    server = NatsServer(nats_binary)
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_nats(nats_binary: str) -> Iterator[NatsServer]:
    """A nats-server of this test alone (it restarts or kills it)."""
    server = NatsServer(nats_binary)
    server.start()
    yield server
    server.close()


@pytest.fixture
async def events(nats: NatsServer) -> AsyncIterator[Events]:
    """A connected Events client on the shared server."""
    client = await Events.connect(nats.url, publisher="tests")
    yield client
    await client.close()


@pytest.fixture
def unique() -> str:
    """A fresh topic-name suffix, so tests on the shared server never see each other's streams."""
    return f"t{next(_names)}"


@pytest.fixture(scope="session")
def orders_gen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/events/protos compiled by rpcframe codegen into a package ``evgen`` (its parent on sys.path)."""
    root = tmp_path_factory.mktemp("evgen")
    generate(Path(__file__).parent / "protos", root / "evgen")
    sys.path.insert(0, str(root))
    return root
