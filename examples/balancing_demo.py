"""Balancing and failover, live: three backends, one killed, one drained and back.

Backends ``a`` and ``c`` run as ``rpcframe serve`` processes, ``b`` in this
process (so the demo can flip its health). Four client threads call Echo
through one rpcframe channel (peak-EWMA, health watching); every half second
the demo prints how many calls each backend answered. Along the way ``a`` is
killed with SIGKILL and ``b`` reports NOT_SERVING, then SERVING again. The
demo fails (exit 1) if any call fails.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import rpcframe
from examples.echo import EchoServicer
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from generated.rpcframe.echo.v1 import echo_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TICK = 0.5


def spawn(name: str) -> tuple[subprocess.Popen[str], str]:
    """An echo backend process tagged ``name``; returns it and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpcframe", "serve", "examples.echo:aio_servicer", "--bind", "127.0.0.1:0",
         "--log-level", "WARNING"],
        cwd=REPO, env={**os.environ, "RPCFRAME_SERVER_ID": name}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    match = re.fullmatch(r"serving on (\S+)\n", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit(f"backend {name} failed to start")
    return proc, match.group(1)


class Load:
    """Closed-loop callers counting answers per backend."""

    def __init__(self, stub: echo_pb2_grpc.EchoServiceStub, callers: int = 4) -> None:
        self.stub = stub
        self.counts: collections.Counter[str] = collections.Counter()
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(callers)]

    def _run(self) -> None:
        request = pb.EchoRequest(message="hi")
        deadline = time.monotonic() + 60  # bounded even if the demo is interrupted
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                _, call = self.stub.Echo.with_call(request, timeout=5)
                server = dict(call.trailing_metadata()).get("x-server-id", "?")
                with self._lock:
                    self.counts[server] += 1
            except rpcframe.RpcError as exc:
                with self._lock:
                    self.failed.append(str(exc))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def snapshot(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self.counts)


def main() -> int:
    """Run the balancing demo; returns the exit code."""
    proc_a, addr_a = spawn("a")
    proc_c, addr_c = spawn("c")
    server_b = rpcframe.Server()
    server_b.add(EchoServicer(server_id="b"))
    addr_b = f"127.0.0.1:{server_b.bind('127.0.0.1:0')}"
    server_b.start()
    config = rpcframe.ChannelConfig(default_timeout=5, slow_start=2.0)
    events = {5: ("kill -9 backend a", lambda: proc_a.send_signal(signal.SIGKILL)),
              10: ("backend b reports NOT_SERVING", lambda: server_b.set_serving("", False)),
              15: ("backend b reports SERVING again", lambda: server_b.set_serving("", True))}  # fmt: skip
    try:
        with rpcframe.connect([addr_a, addr_b, addr_c], config) as channel:
            channel.wait_ready(10)
            load = Load(channel.stub(echo_pb2_grpc.EchoServiceStub))
            print(f"backends a={addr_a} (process), b={addr_b} (in-process), c={addr_c} (process)")
            print(f"policy {config.policy}; calls answered per {TICK}s:\n")
            print(f"{'time':>5}  {'a':>5} {'b':>5} {'c':>5}  failed  event")
            load.start()
            previous = load.snapshot()
            for tick in range(1, 23):
                time.sleep(TICK)
                now = load.snapshot()
                delta = {k: now[k] - previous[k] for k in "abc"}
                previous = now
                label, action = events.get(tick, ("", None))
                counts = " ".join(f"{delta[k]:>5}" for k in "abc")
                print(f"{tick * TICK:>4.1f}s  {counts}  {len(load.failed):>6}  {label}")
                if action is not None:
                    action()
            load.stop()
            total = sum(load.counts.values())
            print(f"\n{total} calls, {len(load.failed)} failed; per backend: {dict(sorted(load.counts.items()))}")
            return 0 if not load.failed and total > 0 else 1
    finally:
        server_b.stop(0)
        for proc in (proc_a, proc_c):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
