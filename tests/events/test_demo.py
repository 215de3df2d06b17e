"""The events act of the demo runs end to end and says what the issue asks of it."""

from __future__ import annotations

import sys

from tests.conftest import run_process
from tests.events.natsserver import NatsServer


async def test_events_demo_act(nats: NatsServer) -> None:  # the fixture: skip where nats-server is missing
    code, out, err = await run_process([sys.executable, "-m", "examples.events_demo"])
    assert code == 0, out + err
    assert "killed with SIGKILL after" in out
    assert "billed: 1000 orders, 1000 bills (0 lost, 0 billed twice: True)" in out
    assert "poison message -> dlq.acme.shop.order-created: does not parse as acme.shop.v1.OrderCreated" in out
