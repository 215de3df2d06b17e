"""Health status changes racing Watch hang-ups never hang the thread-pool server."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import rpcframe
from tests.servicers import ScriptedEcho


def test_status_changes_while_watchers_hang_up_do_not_deadlock() -> None:
    server = rpcframe.Server()
    server.add(ScriptedEcho())
    port = server.bind("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    flips = 0

    def flip() -> None:
        nonlocal flips
        while not stop.is_set():
            server.set_serving("", flips % 2 == 0)
            flips += 1

    flipper = threading.Thread(target=flip, daemon=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            flipper.start()
            for _ in range(50):  # bounded: watchers come and go while the status flips
                watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5) for _ in range(10)]
                for watch in watches:
                    next(watch)
                for watch in watches:
                    watch.cancel()
        stop.set()
        flipper.join(10)
        assert not flipper.is_alive(), "set_serving hung while watchers hung up"
        assert flips > 0
    finally:
        stop.set()
        done = threading.Thread(target=server.stop, args=(0,), daemon=True)
        done.start()
        done.join(15)
        assert not done.is_alive(), "stop() hung"
