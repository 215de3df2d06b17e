"""Backend servers in a child process, known by PID (shared by the benchmark scripts)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import rpcframe
import rpcframe.aio

REPO = Path(__file__).resolve().parents[1]


async def serve_until_sigterm(servicers: Sequence[object], config: rpcframe.ServerConfig | None = None) -> None:
    """In the child: one asyncio server per servicer on a free port, each announced, until SIGTERM.

    ``config`` defaults to no reflection and no grace period.
    """
    config = config or rpcframe.ServerConfig(reflection=False, grace_period=0)
    # Handle SIGTERM before saying "serving on": a parent may stop us at once.
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    servers = []
    for servicer in servicers:
        server = rpcframe.aio.Server(config)
        server.add(servicer)
        port = server.bind("127.0.0.1:0")
        await server.start()
        servers.append(server)
        print(f"serving on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    for server in servers:
        await server.stop(0)


class ChildServers:
    """``python ARGS`` in a child process that prints one ``serving on HOST:PORT`` line per server."""

    def __init__(self, args: Sequence[str], count: int) -> None:
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.addresses: list[str] = []
        for _ in range(count):
            match = re.fullmatch(r"serving on (\S+)\n", self.proc.stdout.readline())
            if not match:
                self.stop()
                raise RuntimeError(f"backend process {' '.join(args)} failed to start")
            self.addresses.append(match.group(1))

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it does not exit within 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
