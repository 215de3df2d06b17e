"""Backend processes for the reliability suite: started, signalled and stopped by PID, measured from /proc."""

from __future__ import annotations

import collections
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks._children import REPO

#: Seconds a backend gets to print ``serving on`` / to exit after SIGTERM before SIGKILL.
START_WITHIN, EXIT_WITHIN = 15.0, 20.0

#: How each server is started: rpcframe's through its CLI (``rpcframe serve``,
#: default settings), grpcio's with examples.bench_server's raw runner (grace
#: 10 s, as ``rpcframe serve``'s default).
STACKS = ("rpcframe", "grpcio")
FRONTS = ("sync", "aio")


def server_args(stack: str, front: str, bind: str = "127.0.0.1:0", logged: bool = False) -> list[str]:
    """``python`` arguments of one BenchService backend (logging executions when ``logged``)."""
    module = "benchmarks.reliability_servers" if logged else "examples.bench_server"
    if stack == "rpcframe":
        obj = "aio_servicer" if front == "aio" else "servicer"
        return ["-m", "rpcframe", "serve", f"{module}:{obj}", "--bind", bind, "--log-level", "WARNING"]
    return ["-m", module, "--raw", f"--{front}", "--bind", bind, "--grace", "10"]


@dataclass
class Stats:
    """One sample of a process: resident memory, open file descriptors, threads."""

    rss_kib: int
    fds: int
    threads: int


def stats(pid: int) -> Stats | None:
    """``pid``'s VmRSS, fd count and thread count from /proc (None once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(re.findall(r"^(\w+):\s+(\d+)", status, re.MULTILINE))
    return Stats(int(fields.get("VmRSS", 0)), fds, int(fields.get("Threads", 0)))


class Backend:
    """One server process, known by PID, announcing ``serving on HOST:PORT``."""

    def __init__(self, args: Sequence[str], name: str, log: Path | None = None) -> None:
        self.name = name
        env = {**os.environ, "RPCFRAME_SERVER_ID": name}
        if log is not None:
            env["RELIABILITY_LOG"] = str(log)
        fd, path = tempfile.mkstemp(prefix=f"reliability-{name}-", suffix=".stderr")
        self._stderr = Path(path)
        with os.fdopen(fd, "ab") as stderr:  # the child writes through its own copy
            self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                         stderr=stderr)  # fmt: skip
        self.pid = self.proc.pid
        self.address = ""

    def wait_ready(self, within: float = START_WITHIN) -> str:
        """The address once the backend says it serves; stops it and raises if it does not in time."""
        assert self.proc.stdout is not None
        deadline, line = time.monotonic() + within, b""
        while not line.endswith(b"\n") and (left := deadline - time.monotonic()) > 0:
            if not select.select([self.proc.stdout], [], [], left)[0]:
                break
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                break
            line += chunk
        match = re.fullmatch(rb"serving on (\S+)\n", line)
        if not match:
            error = f"backend {self.name} did not start: {line!r} {self.stderr_tail()}"
            self.stop()
            raise RuntimeError(error)
        self.address = match.group(1).decode()
        return self.address

    def alive(self) -> bool:
        """Whether the process is still running (a stopped one counts as running)."""
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the backend's PID, if it still runs."""
        if self.alive():
            os.kill(self.pid, sig)

    def wait_exit(self, within: float = EXIT_WITHIN) -> float | None:
        """Seconds until the process exited, or None if it still runs after ``within``."""
        start = time.monotonic()
        try:
            self.proc.wait(within)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - start

    def terminate(self) -> None:
        """SIGCONT + SIGTERM by PID (a SIGSTOPped process would never act on SIGTERM)."""
        if self.alive():
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)

    def stop(self) -> None:
        """:meth:`terminate`, then SIGKILL if it does not exit in time; reaps it."""
        self.terminate()
        if self.wait_exit() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.unlink(missing_ok=True)

    def stderr_text(self) -> str:
        """What the backend has written to stderr so far ("" once it is stopped)."""
        try:
            return self._stderr.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_tail(self, size: int = 600) -> str:
        """The end of what the backend wrote to stderr."""
        return self.stderr_text()[-size:]

    def tracebacks(self) -> int:
        """Python tracebacks the backend has logged so far."""
        return self.stderr_text().count("Traceback (most recent call last)")


def start_all(specs: Sequence[tuple[Sequence[str], str, Path | None]]) -> list[Backend]:
    """Start backends side by side and wait until each serves; stops them all if one fails."""
    backends = [Backend(args, name, log) for args, name, log in specs]
    try:
        for backend in backends:
            backend.wait_ready()
    except BaseException:
        stop_all(backends)
        raise
    return backends


def stop_all(backends: Iterable[Backend]) -> None:
    """Stop every backend by PID (all told first, so their drains overlap)."""
    backends = list(backends)
    for backend in backends:
        backend.terminate()
    for backend in backends:
        backend.stop()


class Sampler:
    """Samples processes' :func:`stats` every ``interval`` s on a thread; keeps each one's peak RSS."""

    def __init__(self, pids: Sequence[int], interval: float = 0.1) -> None:
        self.peak_kib = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for pid in self.peak_kib:
                if (sample := stats(pid)) is not None:
                    self.peak_kib[pid] = max(self.peak_kib[pid], sample.rss_kib)
            if self._stop.wait(self._interval):
                return

    def stop(self) -> dict[int, int]:
        """Stop sampling; peak RSS (KiB) per PID."""
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def executions(logs: Iterable[Path]) -> dict[str, dict[str, list[float]]]:
    """From backend execution logs: per kind, request id -> the wall times it was executed."""
    found: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                found[parts[0]][parts[1]].append(float(parts[2]))
    return found
