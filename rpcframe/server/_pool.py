"""The thread-pool server's handler threads: an executor without futures.

grpc's thread-pool server hands every call to its executor with
``submit(fn, *args)`` and, on the object returned, calls only
``add_done_callback`` (to count the calls running). A
``ThreadPoolExecutor`` builds a ``Future`` per call for that, with a
``Condition`` (an ``RLock``) inside, and its worker sets the result under
that lock and wakes waiters no one has: about 300 Python bytecodes a call,
an eighth of everything grpc's server runs in Python for a unary call
(``python -m benchmarks.bytecodes``). :class:`HandlerPool` queues a
:class:`Task` (the function, its arguments and the callbacks) on a
``SimpleQueue`` read by its threads.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from queue import SimpleQueue
from typing import Any

__all__ = ["HandlerPool", "Task"]

_log = logging.getLogger("rpcframe.server")


class Task:
    """One submitted call: what :meth:`HandlerPool.submit` returns instead of a Future.

    Callbacks run once the function has returned (at once when added
    after that), each exactly once: whoever pops one from the list runs
    it, and ``list.pop`` is atomic, so a worker finishing and grpc adding
    its callback at the same moment cannot both run it.
    """

    __slots__ = ("args", "callbacks", "done", "fn")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.callbacks: list[Callable[[Task], Any]] = []
        self.done = False

    def add_done_callback(self, callback: Callable[[Task], Any]) -> None:
        """Call ``callback(task)`` once the function has returned."""
        self.callbacks.append(callback)
        if self.done:
            self.run_callbacks()

    def run_callbacks(self) -> None:
        """Run (and drop) the callbacks added so far."""
        callbacks = self.callbacks
        while callbacks:
            try:
                callback = callbacks.pop()
            except IndexError:
                return  # another thread took the last one
            try:
                callback(self)
            except Exception:
                _log.exception("a handler task's callback failed")


class HandlerPool(Executor):
    """Up to ``workers`` threads running submitted calls in order of arrival (see the module docstring).

    As in ``ThreadPoolExecutor``, a call submitted while no thread is idle
    starts one more, so a server that is never busy keeps a few. Threads
    say they are idle by adding a token to a list, and each submitted call
    takes one (``list.append`` and ``list.pop`` are atomic: no lock per
    call). As with ``ThreadPoolExecutor``, the threads end when the pool is
    shut down or garbage-collected, and at interpreter exit the handlers
    still running are waited for. After :meth:`shutdown`, calls submitted
    are not run.
    """

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError("a handler pool needs at least one thread")
        self._workers, self._name = workers, name
        self.queue: SimpleQueue[Task | None] = SimpleQueue()
        self._idle: list[None] = []  # a token per thread waiting for a call (more once calls were queued)
        self._threads: list[threading.Thread] = []  # every thread started, kept to be joined at exit
        self._open = True  # not shut down
        self._growing = True  # fewer threads than workers, and not shut down
        self._lock = threading.Lock()
        ended = weakref.finalize(self, _end_threads, self.queue, self._threads)
        ended.atexit = False  # at exit, _join_at_exit ends them and waits
        _pools.add(self)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Task:  # type: ignore[override]
        """Queue ``fn(*args, **kwargs)`` for the next free thread."""
        task = Task(functools.partial(fn, **kwargs) if kwargs else fn, args)
        idle = self._idle
        if idle:
            try:
                idle.pop()  # a waiting thread takes this call
            except IndexError:  # another submitter took the last token
                self._grow()
        elif self._growing:
            self._grow()
        self.queue.put(task)
        return task

    def _grow(self) -> None:
        with self._lock:
            if self._growing:
                name = f"{self._name}_{len(self._threads)}"
                thread = threading.Thread(target=_work, args=(self.queue, self._idle), name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
                self._growing = len(self._threads) < self._workers

    def queued(self) -> int:
        """Calls waiting for a thread."""
        return self.queue.qsize()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """End the threads once the calls queued before have run (``wait``: and wait for that)."""
        with self._lock:
            if self._open:
                self._open = self._growing = False
                _end_threads(self.queue, self._threads)
        if wait:
            for thread in list(self._threads):
                thread.join()


def _end_threads(queue: SimpleQueue[Task | None], threads: list[threading.Thread]) -> None:
    """Tell each thread to end once the calls queued before it have run."""
    for _ in threads:
        queue.put(None)


_pools: weakref.WeakSet[HandlerPool] = weakref.WeakSet()


@atexit.register
def _join_at_exit() -> None:
    # Daemon threads, so an interpreter with a pool never shut down can exit;
    # but a handler still running is waited for, as ThreadPoolExecutor does,
    # also after a shutdown that did not wait (the server's stop()).
    for pool in list(_pools):
        pool.shutdown(wait=True)


def _work(queue: SimpleQueue[Task | None], idle: list[None]) -> None:
    # A thread starts for the call that made it: it says it is idle only once
    # that is done. The token can outlive the wait when a call queued without
    # one is taken next (a later submit then counts on a busy thread, as with
    # ThreadPoolExecutor's semaphore; the pool never shrinks).
    get, ready = queue.get, idle.append
    while (task := get()) is not None:
        try:
            task.fn(*task.args)
        except BaseException:  # grpc's own functions catch what handlers raise: this is grpc failing
            _log.exception("a handler task failed")
        task.done = True
        if task.callbacks:
            task.run_callbacks()
        del task  # not kept (with the call's request and state) while the thread waits
        ready(None)
