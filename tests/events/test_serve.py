"""``rpcframe serve --subscribers``: RPC servicers and event consumers in one process, real nats-server."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import Events
from tests.cli import ServeProcess, assert_cli_error, run_cli
from tests.conftest import wait_until
from tests.events.natsserver import NatsServer
from tests.events.serve_app import GROUP, TOPIC

APP = ("tests.events.serve_app:servicer", "--bind", "127.0.0.1:0", "--grace", "5")
ECHO = "rpcframe.echo.v1.EchoService/Echo"


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def test_serve_hosts_subscribers_in_health_and_drains_them_on_sigterm(nats: NatsServer, tmp_path: Path) -> None:
    handled, release = tmp_path / "handled", tmp_path / "release"
    env = {"RPCFRAME_TEST_NATS": nats.url, "RPCFRAME_TEST_HANDLED": str(handled),
           "RPCFRAME_TEST_RELEASE": str(release)}  # fmt: skip
    server = ServeProcess(*APP, "--subscribers", "tests.events.serve_app:subscribers", env=env)
    events = await Events.connect(nats.url, publisher="test")
    try:
        health = ("health", server.target, "-service", f"events:{TOPIC.name}/{GROUP}")
        wait_until(lambda: run_cli(*health).stdout == "SERVING\n", timeout=20, interval=0.2)
        call = run_cli("call", server.target, ECHO, "-d", '{"message": "rpc"}')
        assert (call.returncode, call.stdout.strip()) == (0, '{"message": "rpc"}'), call.stderr
        for i in range(5):
            await events.publish(TOPIC, pb.EchoRequest(message=f"e{i}"))
        wait_until(lambda: len(_lines(handled)) == 5, timeout=20)
        await events.publish(TOPIC, pb.EchoRequest(message="hold"))
        wait_until(release.with_suffix(".started").exists, timeout=20)
        server.proc.send_signal(signal.SIGTERM)
        try:  # draining: it waits for the handler in flight
            server.proc.wait(0.5)
            raise AssertionError("the server exited with a handler in flight")
        except subprocess.TimeoutExpired:
            pass
        release.touch()
        assert server.proc.wait(20) == 0, server.kill()
        assert "Traceback" not in server.kill()
        assert sorted(_lines(handled)) == ["e0", "e1", "e2", "e3", "e4", "hold"]
        info = await events.broker.js.consumer_info(TOPIC.stream.name, GROUP)  # type: ignore[attr-defined]
        assert info.num_ack_pending == 0  # the held event was acked before the exit
        assert info.num_pending == 0
    finally:
        server.kill()
        await events.close()


def test_serve_refuses_subscribers_it_cannot_host(tmp_path: Path) -> None:
    sync = run_cli("serve", "examples.echo:servicer", "--bind", "127.0.0.1:0",
                   "--subscribers", "tests.events.serve_app:subscribers")  # fmt: skip
    assert_cli_error(sync, 2, "--subscribers runs on the asyncio server")
    plain = run_cli("serve", *APP, "--subscribers", "tests.events.serve_app:not_async")
    assert_cli_error(plain, 2, "expected an async function")
    env = {"RPCFRAME_TEST_NATS": "nats://127.0.0.1:1", "RPCFRAME_TEST_HANDLED": str(tmp_path / "h"),
           "RPCFRAME_TEST_RELEASE": str(tmp_path / "r")}  # fmt: skip
    down = run_cli("serve", *APP, "--subscribers", "tests.events.serve_app:subscribers", env=env, timeout=60)
    assert_cli_error(down, 1, "the subscribers did not start")
