"""The thread-pool server's executor: calls run on its threads, callbacks exactly once, threads only as needed."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rpcframe.server._pool import HandlerPool, Task
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pool() -> Iterator[HandlerPool]:
    pool = HandlerPool(4, "test-handler")
    yield pool
    pool.shutdown(wait=True)


def test_a_call_runs_on_a_pool_thread_and_its_callback_after_it(pool: HandlerPool) -> None:
    seen: list[tuple[str, object, object]] = []
    finished = threading.Event()

    def call(a: int, *, b: int) -> None:
        seen.append(("call", threading.current_thread().name, a + b))

    def callback(task: Task) -> None:
        seen.append(("callback", task.done, None))
        finished.set()

    pool.submit(call, 1, b=2).add_done_callback(callback)
    assert finished.wait(5)
    assert seen == [("call", "test-handler_0", 3), ("callback", True, None)]


def test_a_callback_added_after_the_call_returned_runs_at_once(pool: HandlerPool) -> None:
    task = pool.submit(lambda: None)
    wait_until(lambda: task.done, timeout=5)
    calls: list[Task] = []
    task.add_done_callback(calls.append)
    assert calls == [task]  # in the caller's thread, before add_done_callback returned


def test_each_callback_runs_exactly_once_when_adding_races_with_the_end(pool: HandlerPool) -> None:
    counts = [0] * 2000
    lock = threading.Lock()

    def count(index: int) -> None:
        with lock:
            counts[index] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        tasks = [pool.submit(lambda: None) for _ in counts]
        for index, task in enumerate(tasks):
            task.add_done_callback(lambda _task, i=index: count(i))  # type: ignore[misc]
        wait_until(lambda: all(t.done for t in tasks) and sum(counts) == len(counts), timeout=10)
    finally:
        sys.setswitchinterval(interval)
    assert set(counts) == {1}


def test_threads_start_only_while_calls_wait_and_never_beyond_the_size(pool: HandlerPool) -> None:
    for _ in range(20):  # one call at a time: one thread does them all
        task = pool.submit(lambda: None)
        wait_until(lambda t=task: t.done, timeout=5)  # type: ignore[misc]
    assert len(pool._threads) == 1
    release = threading.Event()
    blocked = [pool.submit(release.wait, 10) for _ in range(7)]
    wait_until(lambda: pool.queued() == 3, timeout=5)  # 4 threads busy, 3 calls wait for one
    assert len(pool._threads) == 4
    release.set()
    wait_until(lambda: all(t.done for t in blocked), timeout=5)
    assert pool.queued() == 0
    assert len(pool._threads) == 4


def test_a_call_does_not_wait_behind_a_busy_thread_while_the_pool_may_grow(pool: HandlerPool) -> None:
    """The second call starts a thread of its own although no call is queued when it arrives."""
    release, second = threading.Event(), threading.Event()
    first = pool.submit(release.wait, 10)
    wait_until(lambda: pool.queued() == 0, timeout=5)  # the first call runs: nothing waits
    pool.submit(second.set)
    try:
        assert second.wait(5)
    finally:
        release.set()
    wait_until(lambda: first.done, timeout=5)
    assert len(pool._threads) == 2


def test_a_failing_call_is_logged_and_its_thread_goes_on(pool: HandlerPool, caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="rpcframe.server"):
        failed = pool.submit(fail)
        wait_until(lambda: failed.done, timeout=5)
        after = pool.submit(lambda: None)
        wait_until(lambda: after.done, timeout=5)
    assert "a handler task failed" in caplog.text
    assert "boom" in caplog.text
    assert len(pool._threads) == 1


def test_shutdown_ends_the_threads_after_the_calls_queued_before() -> None:
    pool = HandlerPool(2, "test-handler")
    ran: list[int] = []
    for n in range(5):
        pool.submit(ran.append, n)
    threads = list(pool._threads)
    pool.shutdown(wait=True)
    assert sorted(ran) == [0, 1, 2, 3, 4]
    assert threads
    assert not any(t.is_alive() for t in threads)


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        HandlerPool(0, "none")


def test_a_pool_dropped_without_shutdown_ends_its_threads() -> None:
    pool = HandlerPool(2, "test-dropped")
    ran = threading.Event()
    pool.submit(ran.set)
    assert ran.wait(5)
    threads = list(pool._threads)
    del pool
    gc.collect()
    wait_until(lambda: not any(t.is_alive() for t in threads), timeout=5)


def test_at_exit_a_running_handler_is_waited_for(tmp_path: Path) -> None:
    """As with ThreadPoolExecutor: the interpreter exits once the handler returned, not in the middle of it."""
    marker = tmp_path / "finished"
    script = f"""
import threading, time
from rpcframe.server._pool import HandlerPool
pool = HandlerPool(2, "exit")
started = threading.Event()
def handler():
    started.set()
    time.sleep(0.3)
    open({str(marker)!r}, "w").close()
pool.submit(handler)
started.wait(5)
"""  # the main thread ends while the handler sleeps
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert marker.exists()


def test_at_exit_a_handler_still_running_after_shutdown_without_wait_is_waited_for(tmp_path: Path) -> None:
    """The server's stop() shuts its pool down without waiting; exit still waits, as with ThreadPoolExecutor."""
    marker = tmp_path / "finished"
    script = f"""
import threading, time
from rpcframe.server._pool import HandlerPool
pool = HandlerPool(2, "exit")
started = threading.Event()
def handler():
    started.set()
    time.sleep(0.3)
    open({str(marker)!r}, "w").close()
pool.submit(handler)
started.wait(5)
pool.shutdown(wait=False)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert marker.exists()
