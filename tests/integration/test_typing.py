"""Typing that types (issue 16): ``mypy --strict`` on a user's module sees rpcframe and the generated stubs.

The module is written where a user's project would be (a temporary directory
with its own mypy config, not this repository), so mypy finds ``rpcframe`` and
``generated`` through the installed package, as on a user's machine: the
editable install must be visible to mypy, and grpc's stubs (types-grpcio)
installed with rpcframe, or every stub method is ``Any`` and nothing below is
caught.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HEADER = """\
import asyncio

import rpcframe
import rpcframe.aio
from generated.rpcframe.echo.v1 import echo_pb2, echo_pb2_grpc


def call_sync() -> str:
    with rpcframe.connect("127.0.0.1:50051") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        reply = stub.Echo(echo_pb2.EchoRequest(message="hi"), timeout=1.0)
        total = sum(r.index for r in stub.Expand(echo_pb2.ExpandRequest(message="x", count=2)))
        collected = stub.Collect(iter([echo_pb2.EchoRequest(message="a")]))
{sync_errors}\
        return f"{{reply.message}} {{total}} {{collected.count}}"


async def call_aio() -> str:
    async with rpcframe.aio.connect("127.0.0.1:50051") as channel:
        stub = channel.stub(echo_pb2_grpc.EchoServiceStub)
        reply = await stub.Echo(echo_pb2.EchoRequest(message="hi"), timeout=1.0)
        total = 0
        async for r in stub.Expand(echo_pb2.ExpandRequest(message="x", count=2)):
            total += r.index
{aio_errors}\
        return f"{{reply.message}} {{total}}"


def main() -> None:
    print(call_sync(), asyncio.run(call_aio()))
"""

# Each line a user could get wrong, with the mypy error code it must produce.
SYNC_ERRORS = {
    '        wrong = stub.Echo(echo_pb2.ExpandRequest(message="hi"))  # wrong request type\n': "arg-type",
    "        print(reply.messag)  # wrong response attribute\n": "attr-defined",
}
AIO_ERRORS = {
    '        wrong = await stub.Echo(echo_pb2.ExpandRequest(message="hi"))  # wrong request type\n': "arg-type",
    "        print(reply.messag)  # wrong response attribute\n": "attr-defined",
}

_ERROR = re.compile(r"^user_module\.py:(\d+): error: .*\[([a-z-]+)\]$", re.M)


def _run_mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``source`` from a user's directory, with a user's environment."""
    (tmp_path / "user_module.py").write_text(source)
    (tmp_path / "mypy.ini").write_text("[mypy]\n")  # the user's own config, not this repository's
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / ".mypy_cache"), "user_module.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip


def test_wrong_request_type_and_response_attribute_are_caught(tmp_path: Path) -> None:
    source = HEADER.format(sync_errors="".join(SYNC_ERRORS), aio_errors="".join(AIO_ERRORS))
    lines = source.splitlines(keepends=True)
    expected = {(lines.index(line) + 1, code) for line, code in SYNC_ERRORS.items()}
    start = lines.index("async def call_aio() -> str:\n")
    expected |= {(lines.index(line, start) + 1, code) for line, code in AIO_ERRORS.items()}
    result = _run_mypy(tmp_path, source)
    found = {(int(line), code) for line, code in _ERROR.findall(result.stdout)}
    # Exactly these four: also no "cannot find rpcframe", no missing grpc stubs, and no false
    # positives from the asyncio stub being typed as the sync one.
    assert found == expected, result.stdout + result.stderr
    assert result.returncode == 1


def test_correct_module_passes(tmp_path: Path) -> None:
    result = _run_mypy(tmp_path, HEADER.format(sync_errors="", aio_errors=""))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found in 1 source file"), result.stdout
