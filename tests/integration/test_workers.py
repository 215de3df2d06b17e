"""``rpcframe serve --workers N``: several server processes behind one address, as real processes.

The servers are ``tests.servicers:worker_probe`` (answers carry the worker's
PID; Record executions are logged per request id to a shared file), the
client one rpcframe channel with several connections per endpoint.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rpcframe
import rpcframe.aio
from examples.bench_server import BenchServicer
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc
from tests.cli import REPO, ServeProcess, assert_cli_error, run_cli
from tests.conftest import eventually, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="several workers need Linux")

PROBES = {"sync": "tests.servicers:worker_probe", "aio": "tests.servicers:aio_worker_probe"}
CONNECTIONS = 16  # over 2 workers: every worker gets one unless 16 coin flips agree (p = 2**-15)
CALLERS = 16


def _workers(pid: int) -> set[int]:
    """Live child processes of ``pid`` (zombies excluded), from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


class Workers:
    """``rpcframe serve PROBE --workers N`` with its record log, stopped by PID."""

    def __init__(self, tmp_path: Path, front: str = "sync", count: int = 2, *extra: str) -> None:
        self.log = tmp_path / "records.log"
        self.poison = tmp_path / "poison"
        env = {"RPCFRAME_RECORD_LOG": str(self.log), "RPCFRAME_PROBE_POISON": str(self.poison)}
        self.serve = ServeProcess(PROBES[front], "--bind", "127.0.0.1:0", "--workers", str(count), "--grace", "5",
                                  *extra, env=env)  # fmt: skip
        self.proc = self.serve.proc
        self.pid = self.proc.pid
        self.target = self.serve.target
        self._stderr: list[str] = []
        stream = self.proc.stderr
        assert stream is not None
        self._reader = threading.Thread(target=lambda: self._stderr.extend(iter(stream.readline, "")), daemon=True)
        self._reader.start()
        wait_until(lambda: len(_workers(self.pid)) == count, timeout=5)
        self.pids = _workers(self.pid)

    def stderr(self) -> str:
        """What the supervisor and its workers wrote to stderr so far."""
        return "".join(self._stderr)

    def executions(self) -> collections.Counter[str]:
        """Record executions so far, by request id."""
        text = self.log.read_text() if self.log.exists() else ""
        return collections.Counter(line.split()[0] for line in text.splitlines())

    def terminate(self, within: float = 10) -> float:
        """SIGTERM the supervisor: it exits 0 once every worker drained, without a traceback; seconds it took."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(within) == 0, self.stop()
        took = time.monotonic() - sent
        assert not _workers(self.pid)
        assert "Traceback" not in self.stop()
        return took

    def stop(self) -> str:
        """Kill the supervisor and whatever workers remain (by PID); all it wrote to stderr."""
        workers = _workers(self.pid)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reader.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.stderr()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    started: list[Workers] = []

    def start(front: str = "sync", count: int = 2, *extra: str) -> Workers:
        workers = Workers(tmp_path, front, count, *extra)
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.stop()


def _channel(target: str, connections: int = CONNECTIONS, **kwargs: object) -> rpcframe.Channel:
    config = rpcframe.ChannelConfig(connections_per_endpoint=connections, default_timeout=5, **kwargs)  # type: ignore[arg-type]
    channel = rpcframe.connect(target, config)
    wait_until(lambda: [state for _, state in channel.endpoints()] == ["READY"] * connections, timeout=5)
    return channel


def _pids_answering(channel: rpcframe.Channel, calls: int = 4 * CONNECTIONS) -> set[int]:
    stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
    return {int(stub.Unary(bench_pb2.BenchRequest()).server_id) for _ in range(calls)}


@pytest.mark.parametrize("front", ["sync", "aio"])
def test_one_client_reaches_every_worker(served: Callable[..., Workers], front: str) -> None:
    workers = served(front)
    assert len(workers.pids) == 2
    assert workers.pid not in workers.pids
    with _channel(workers.target, policy="round_robin") as channel:
        addresses = [address for address, _ in channel.endpoints()]
        assert addresses == [workers.target] + [f"{workers.target}#{i}" for i in range(2, CONNECTIONS + 1)]
        assert _pids_answering(channel) == workers.pids
    # One connection reaches one worker: what the extra connections are for.
    with rpcframe.connect(workers.target, rpcframe.ChannelConfig(default_timeout=5)) as single:
        assert len(_pids_answering(single)) == 1


async def test_an_asyncio_client_reaches_every_worker(served: Callable[..., Workers]) -> None:
    workers = served("aio")
    config = rpcframe.ChannelConfig(connections_per_endpoint=CONNECTIONS, policy="round_robin", default_timeout=5)
    async with rpcframe.aio.connect(workers.target, config) as channel:

        async def all_ready() -> bool:
            return [state for _, state in channel.endpoints()] == ["READY"] * CONNECTIONS

        await eventually(all_ready)
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        answers = [await stub.Unary(bench_pb2.BenchRequest()) for _ in range(4 * CONNECTIONS)]
    assert {int(answer.server_id) for answer in answers} == workers.pids


def test_a_killed_worker_is_replaced(served: Callable[..., Workers]) -> None:
    workers = served()
    victim = min(workers.pids)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "serving" in workers.stderr().partition("restarting it")[2], timeout=5)
    replaced = _workers(workers.pid)
    assert len(replaced) == 2
    assert len(replaced - workers.pids) == 1
    assert f"(pid {victim}) exited (killed by SIGKILL)" in workers.stderr()
    # A new client's connections spread over both: the replacement serves.
    with _channel(workers.target, policy="round_robin") as channel:
        wait_until(lambda: _pids_answering(channel) == replaced, timeout=5)
    workers.terminate()


def _record(stub: bench_pb2_grpc.BenchServiceStub, request_id: str, ms: int) -> str:
    return str(stub.Record(bench_pb2.RecordRequest(key=f"{request_id}@{ms}")).server_id)


def test_sigterm_drains_every_worker(served: Callable[..., Workers]) -> None:
    workers = served()
    with _channel(workers.target, policy="round_robin") as channel:
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        results: list[str | BaseException] = []

        def call(index: int) -> None:
            try:
                results.append(_record(stub, f"drain-{index}", 1000))
            except BaseException as exc:  # noqa: BLE001 - every outcome is counted below
                results.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLERS)]
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(workers.executions().values()) == CALLERS, timeout=5)
        took = workers.terminate(within=5)  # the grace
        for thread in threads:
            thread.join(5)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed
    assert len(results) == CALLERS
    assert {int(pid) for pid in results} == workers.pids  # the in-flight calls ran on both workers
    assert 1.0 <= took < 5  # waited for the 1 s calls, not for the grace


class Load:
    """``CALLERS`` threads calling Record (non-idempotent, 5 ms) with unique ids until stopped."""

    def __init__(self, channel: rpcframe.Channel) -> None:
        self._stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        self._stop = threading.Event()
        self.ok: collections.Counter[str] = collections.Counter()  # answers by worker PID
        self.failed: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CALLERS)]
        for thread in self._threads:
            thread.start()

    def _run(self, caller: int) -> None:
        for n in range(100_000):  # bounded; stop() ends it long before
            if self._stop.is_set():
                return
            try:
                self.ok[_record(self._stub, f"{caller}.{n}", 5)] += 1
            except rpcframe.RpcError as exc:
                self.failed.append(exc)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


@pytest.mark.parametrize("front", ["sync", "aio"])
def test_sighup_restarts_workers_one_at_a_time_without_losing_a_call(
    served: Callable[..., Workers], front: str
) -> None:
    # Admission control off: on this shared 2-core machine the load alone makes it refuse a few calls now and
    # then, with or without a restart; what is measured here is what the restart costs.
    workers = served(front, 2, "--no-overload-protection")
    with _channel(workers.target) as channel:
        load = Load(channel)
        try:
            wait_until(lambda: sum(load.ok.values()) > 200, timeout=5)
            workers.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: not _workers(workers.pid) & workers.pids, timeout=8)
            renewed = _workers(workers.pid)
            before = sum(load.ok.values())
            wait_until(lambda: sum(load.ok.values()) > before + 200, timeout=5)
        finally:
            load.stop()
    assert len(renewed) == 2, renewed
    assert not load.failed, load.failed[:3]
    executions = workers.executions()
    assert sum(load.ok.values()) == len(executions)  # every answered call ran, and ran once
    assert [key for key, times in executions.items() if times > 1] == []
    assert {int(pid) for pid in load.ok} & renewed  # the new workers took calls
    workers.terminate()


def test_a_rolling_restart_whose_new_workers_fail_keeps_the_old_ones(served: Callable[..., Workers]) -> None:
    workers = served()
    workers.poison.touch()  # the deployed code no longer starts
    workers.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "rolling restart stopped" in workers.stderr(), timeout=8)
    # The failed new worker may still be exiting when the supervisor logs it.
    wait_until(lambda: _workers(workers.pid) == workers.pids, timeout=5)
    with _channel(workers.target, policy="round_robin") as channel:
        assert _pids_answering(channel) == workers.pids
    workers.terminate()


def test_a_crash_loop_stops_the_supervisor(served: Callable[..., Workers]) -> None:
    workers = served()
    workers.poison.touch()
    os.kill(min(workers.pids), signal.SIGKILL)  # every restart now fails at once
    assert workers.proc.wait(10) == 1
    err = workers.stop()
    errors = [line for line in err.splitlines() if line.startswith("rpcframe: error: ")]
    assert len(errors) == 1, err
    assert "failed 5 times in a row" in errors[0]
    assert "poisoned" in errors[0]
    assert not _workers(workers.pid)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--workers 0: --workers counts server processes"),
        ("-1", "--workers -1: --workers counts server processes"),
        ("two", "--workers 'two': --workers counts server processes"),
        ("1.5", "the thread-pool size is now --threads"),
        ("64", "--workers 64: more than"),
    ],
)
def test_bad_worker_counts_are_refused(value: str, message: str) -> None:
    assert_cli_error(run_cli("serve", PROBES["sync"], "--bind", "127.0.0.1:0", f"--workers={value}"), 2, message)


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--bind", "unix:/tmp/rpcframe-workers.sock"], "several workers cannot share a unix socket", 2),
        (["--bind", "127.0.0.1:0", "--metrics-port", "0"], "--metrics-port", 2),
        (["--bind", "127.0.0.1:0", "--threads", "0"], "max_workers must be >= 1", 2),
    ],
)
def test_what_several_workers_cannot_do(args: list[str], message: str, code: int) -> None:
    assert_cli_error(run_cli("serve", PROBES["sync"], "--workers", "2", *args), code, message)


def test_a_worker_that_cannot_start_is_one_error() -> None:
    result = run_cli("serve", "no_such_module:x", "--bind", "127.0.0.1:0", "--workers", "2")
    assert_cli_error(result, 1, "cannot import module 'no_such_module'")


def test_a_port_in_use_is_refused_not_shared(served: Callable[..., Workers]) -> None:
    workers = served()
    result = run_cli("serve", PROBES["sync"], "--bind", workers.target, "--workers", "2")
    assert_cli_error(result, 1, f"cannot bind {workers.target}: address already in use")


def test_grpc_options_replace_rpcframes_so_reuseport() -> None:
    # rpcframe's own so_reuseport=0 keeps one server from sharing a port; grpc keeps the first of two equal keys,
    # so the user's value must replace it, not follow it.
    shared = rpcframe.ServerConfig(grpc_options=(("grpc.so_reuseport", 1),))
    first, second, alone = rpcframe.Server(shared), rpcframe.Server(shared), rpcframe.Server()
    port = first.bind("127.0.0.1:0")
    assert second.bind(f"127.0.0.1:{port}") == port
    with pytest.raises(rpcframe.ConfigError, match="cannot bind"):
        alone.bind(f"127.0.0.1:{port}")
    for server in (first, second, alone):
        server.stop(0)


def test_serve_from_code_with_workers(tmp_path: Path) -> None:
    code = (
        "import rpcframe\n"
        "rpcframe.serve('tests.servicers:worker_probe', '127.0.0.1:0', workers=2,\n"
        "               on_ready=lambda addresses: print('serving on', addresses[0], flush=True))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
        target = line.split()[-1]
        wait_until(lambda: len(_workers(proc.pid)) == 2, timeout=5)
        with _channel(target, policy="round_robin") as channel:
            assert _pids_answering(channel) == _workers(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_serve_refuses_a_bad_worker_count() -> None:
    with pytest.raises(rpcframe.ConfigError, match="workers must be >= 1"):
        rpcframe.serve("tests.servicers:worker_probe", workers=0)


@pytest.mark.parametrize("count", [0, -1, 257])
def test_connections_per_endpoint_is_checked(count: int) -> None:
    with pytest.raises(rpcframe.ConfigError, match="connections_per_endpoint must be within 1..256"):
        rpcframe.ChannelConfig(connections_per_endpoint=count)


def test_connections_to_a_draining_server_move_to_another_on_the_same_port() -> None:
    # Every connection of the client lands on `first` (the only one listening when it connects); `second` joins
    # the port later, as a rolling restart's new worker does. When `first` drains, the client replaces the
    # connections that report NOT_SERVING: new ones reach `second` before `first` refuses calls.
    shared = rpcframe.ServerConfig(grpc_options=(("grpc.so_reuseport", 1),), grace_period=5)
    first, second = rpcframe.Server(shared), rpcframe.Server(shared)
    first.add(BenchServicer(server_id="first"))
    second.add(BenchServicer(server_id="second"))
    port = first.bind("127.0.0.1:0")
    first.start()
    try:
        with _channel(f"127.0.0.1:{port}", connections=4) as channel:
            stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
            assert {stub.Unary(bench_pb2.BenchRequest()).server_id for _ in range(16)} == {"first"}
            second.bind(f"127.0.0.1:{port}")
            second.start()
            answers: collections.Counter[str] = collections.Counter()
            failed: list[BaseException] = []
            stop = threading.Event()

            def caller(number: int) -> None:
                for n in range(100_000):  # bounded; stop ends it first
                    if stop.is_set():
                        return
                    try:
                        answers[stub.Record(bench_pb2.RecordRequest(key=f"{number}.{n}")).server_id] += 1
                    except rpcframe.RpcError as exc:
                        failed.append(exc)

            callers = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
            for thread in callers:
                thread.start()
            try:
                first.stop()
                wait_until(lambda: answers["second"] > 100, timeout=5)
            finally:
                stop.set()
                for thread in callers:
                    thread.join(10)
        assert not failed, failed[:3]
        assert answers["first"] > 0
    finally:
        first.stop(0)
        second.stop(0)
