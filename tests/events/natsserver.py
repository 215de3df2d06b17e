"""A real ``nats-server -js`` on 127.0.0.1, started and stopped by PID (tests and benchmarks)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["NatsServer", "nats_server_binary"]

_LISTEN = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")


def nats_server_binary() -> str | None:
    """The nats-server executable (Debian installs it in /usr/sbin), or ``None``."""
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")


class NatsServer:
    """One nats-server with JetStream and a temporary store; :meth:`restart` keeps port and store."""

    def __init__(self, binary: str, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.extra = extra  # more nats-server flags, e.g. ("--auth", TOKEN)
        self.store = tempfile.mkdtemp(prefix="rpcframe-nats-")
        self.port = -1  # nats-server picks a free port on the first start
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, within: float = 10.0) -> None:
        """Start and wait until it accepts clients (reads its log, bounded)."""
        log = Path(self.store) / "nats.log"
        log.write_text("")
        args = [
            self.binary,
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            self.store,
            "-l",
            str(log),
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + within
        while time.monotonic() < end:
            text = log.read_text()
            match = _LISTEN.search(text)
            if match and "Server is ready" in text:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)  # polling the server's log for readiness, bounded by `within`
        self.stop()
        raise RuntimeError(f"nats-server did not start: {log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it by PID (SIGKILL if it does not exit in 10 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop, then start on the same port with the same store."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the store."""
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)
