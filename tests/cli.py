"""Helpers for tests that drive the ``rpcframe`` command as a real subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READY = r"serving on (\S+:\d+)\n"


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``rpcframe ARGS`` to completion (stdin empty unless given; ``env`` added to this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "rpcframe", *args], cwd=REPO, input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True, text=True, timeout=timeout,
        check=False, env=None if env is None else {**os.environ, **env},
    )  # fmt: skip


def assert_cli_error(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    """Exit ``code`` and one ``rpcframe: error:`` line containing ``message``; no traceback, no output."""
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("rpcframe: error: ")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


class ServeProcess:
    """``rpcframe serve ARGS`` in a child process, stopped by PID.

    ``ready`` matches the first stdout line and captures the target.
    """

    def __init__(self, *args: str, ready: str = READY, within: float = 30, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rpcframe", "serve", *args],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=None if env is None else {**os.environ, **env},
        )  # fmt: skip
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(within)
        if not lines or not lines[0]:
            pytest.fail(f"server did not become ready: {self.kill()}")
        match = re.fullmatch(ready, lines[0])
        assert match, lines[0]
        self.target = match.group(1)

    def kill(self) -> str:
        """Kill the process if it still runs; return what it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=10)[1]

    def terminate(self) -> None:
        """SIGTERM, then a bounded wait: it drains and exits 0 without a traceback."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server ignored SIGTERM: {self.kill()}")
        err = self.kill()
        assert code == 0, err
        assert "Traceback" not in err, err
