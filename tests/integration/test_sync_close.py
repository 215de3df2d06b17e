"""Closing a sync endpoint while a state change is being delivered leaves grpc nothing to poll.

grpc delivers connectivity changes on threads of its own, from a snapshot
taken before rpcframe unsubscribes, so a change can arrive while (or after)
the endpoint closes. If handling it subscribed to the channel again (an
IDLE channel used to be kicked with a ready-future), grpc would start a
polling thread on the closed channel, which dies with "Cannot monitor
channel state: Channel closed!" -- seen once in CI as an unhandled thread
exception.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

import rpcframe
from rpcframe.balancing.balancer import Connectivity
from rpcframe.client._sync import _Subchannel
from tests.conftest import Running, wait_until


class _HeldCore:
    """Stands in for the balancer: records states and can hold a delivery inside ``set_connectivity``."""

    def __init__(self) -> None:
        self.states: list[Connectivity] = []
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def set_connectivity(self, address: str, state: Connectivity, handle: object = None) -> None:
        self.states.append(state)
        if self.hold:
            self.entered.set()
            self.release.wait(10)


def _closed(channel: Any) -> bool:
    try:
        channel.check_connectivity_state(False)
    except ValueError:
        return True
    return False


def test_state_change_delivered_during_close_does_not_watch_the_closed_channel(
    sync_server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    core = _HeldCore()
    sub = _Subchannel(sync_server.target, core, rpcframe.ChannelConfig(health_check=False))  # type: ignore[arg-type]
    wait_until(lambda: sub.ready(), timeout=10)

    # A delivery of IDLE that has passed its closed-check when close() begins.
    core.hold = True
    late = threading.Thread(target=sub._on_state, args=(grpc.ChannelConnectivity.IDLE,))
    late.start()
    assert core.entered.wait(10)
    sub.close()
    wait_until(lambda: _closed(sub._cy_channel), timeout=15)
    core.release.set()
    late.join(10)

    assert not late.is_alive()
    state = sub.channel._connectivity_state
    assert not state.polling, "a polling thread was started on the closed channel"
    assert not state.callbacks_and_connectivities
    assert errors == []
