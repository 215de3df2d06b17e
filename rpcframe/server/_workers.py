"""Serving on every core: one server process per worker behind one address.

A Python server runs its handlers on one core at a time (the GIL). With
``workers`` > 1 a supervisor forks that many worker processes; each builds
its own rpcframe server (thread-pool or asyncio) and listens on the same
address with ``SO_REUSEPORT``, so the kernel spreads incoming *connections*
over them. Calls on one connection stay on its worker: a client reaches
every worker by opening several connections
(``ChannelConfig.connections_per_endpoint``).

The supervisor forks before any grpc object exists in it and never creates
one (grpc's threads and polling state do not survive a fork). Each worker
builds its servicers after the fork; a ``MODULE:OBJECT`` target is imported
there, so a rolling restart runs the code on disk now. The supervisor
writes nothing to stdout itself but the ``serving on HOST:PORT`` lines
once every worker serves.

Signals to the supervisor: SIGTERM or SIGINT drain every worker (each
server's ``stop()``) and exit 0 once all have; SIGHUP restarts the workers
one at a time (a new worker starts, and only once it serves is the old one
drained), so a deploy loses no call. A worker that dies is replaced after
a backoff; a slot whose workers keep dying soon after they start stops the
supervisor with an error (a crash loop). Workers run in their own process
group, so a terminal's Ctrl-C or ``timeout`` reaches the supervisor alone,
which stops each worker once: a second SIGTERM during a drain would end a
worker with its calls in flight (under systemd: ``KillMode=mixed``). A
rolling restart reloads the servicers' modules, not rpcframe or grpc, which
the supervisor itself imported.

Linux only: elsewhere ``SO_REUSEPORT`` does not spread TCP connections
over the sockets sharing a port. Unix-socket addresses cannot be shared
(a second bind replaces the socket file), so several workers need TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import importlib
import inspect
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, NoReturn

from .. import _loop
from ..config import ServerConfig
from ..errors import ConfigError, RpcframeError

__all__ = [
    "Supervisor", "WorkerError", "announced", "cpu_count", "is_async", "serve", "serve_here", "servicers_of",
    "stop_within", "with_reuseport",
]  # fmt: skip

_LOG = logging.getLogger("rpcframe.workers")

#: Serves on the given addresses, calls ``ready()`` once serving, returns after draining on SIGTERM.
WorkerMain = Callable[[list[str], Callable[[], None]], None]

_REUSEPORT = (("grpc.so_reuseport", 1),)

_START_WITHIN = 60.0  # seconds a worker has to start serving
_STOP_MARGIN = 10.0  # seconds past a worker's grace before it is killed
_BACKOFF = (0.1, 10.0)  # seconds: first and longest wait before restarting a dead worker's slot
_CRASH_LOOP = 5  # failures of one slot in a row, each soon after its start, that stop the supervisor
_STABLE = 30.0  # seconds up after which a worker's death starts a new count


class WorkerError(RpcframeError):
    """The workers could not be started, or one kept crashing; ``exit_code`` is the command's."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def cpu_count() -> int:
    """The cores this process may run on (``workers="auto"``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# -- servicers: what a worker serves ----------------------------------------------------------


def _looks_like_servicer(obj: Any) -> bool:
    return any(c.__module__.endswith("_pb2_grpc") for c in type(obj).__mro__[1:])


def servicers_of(obj: Any) -> list[Any]:
    """``obj`` as a list of servicer instances.

    ``obj`` is a servicer (an instance of a generated ``*Servicer``
    subclass), a class or factory returning one or an iterable of them, or
    such an iterable. A factory's own exception propagates; anything else
    is a ConfigError.
    """
    if inspect.isclass(obj) or (callable(obj) and not _looks_like_servicer(obj)):
        obj = obj()
    if isinstance(obj, Iterable) and not isinstance(obj, str | bytes) and not _looks_like_servicer(obj):
        items = list(obj)
    else:
        items = [obj]
    if not items or not all(_looks_like_servicer(s) for s in items):
        raise ConfigError("the object must be a servicer (subclass of a generated *Servicer), "
                          "a class, or a factory returning one or a list of them")  # fmt: skip
    return items


def is_async(servicers: Sequence[Any]) -> bool:
    """Whether the servicers' own (overridden) methods are coroutines (then the asyncio server serves them)."""
    for servicer in servicers:
        for name, member in inspect.getmembers(type(servicer)):
            if name.startswith("_") or member.__module__ is None:
                continue
            if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
                return True
    return False


def serve_here(
    servicers: Sequence[Any],
    config: ServerConfig,
    binds: Sequence[str],
    *,
    aio: bool | None = None,
    uvloop: bool = True,
    on_ready: Callable[[tuple[int, ...]], None] | None = None,
    subscribers: Callable[[], Awaitable[Iterable[Any]]] | None = None,
) -> None:
    """Serve ``servicers`` in this process until SIGTERM/SIGINT, then drain.

    ``on_ready`` gets the bound ports (in ``binds`` order) once the server
    accepts calls. The asyncio server is used when ``aio`` says so, or when
    it is None and the servicers' methods are coroutines. ``subscribers``
    (asyncio server only): a coroutine function returning event consumers
    and workers (:mod:`rpcframe.events`) to host beside the servicers.
    """
    from . import _aio, _sync  # grpc is imported by the worker, after the fork

    if subscribers is not None or (is_async(servicers) if aio is None else aio):

        async def serve_aio() -> None:
            server = _aio.Server(config)
            _add_and_bind(server, servicers, binds)
            ready = None if on_ready is None else lambda: on_ready(server.ports)
            if subscribers is None:
                await server.run(on_ready=ready)
            else:
                await _run_with_subscribers(server, subscribers, ready)

        _loop.run(serve_aio(), use_uvloop=uvloop)
        return
    server = _sync.Server(config)
    _add_and_bind(server, servicers, binds)
    server.run(on_ready=None if on_ready is None else lambda: on_ready(server.ports))


async def _run_with_subscribers(
    server: Any, factory: Callable[[], Awaitable[Iterable[Any]]], on_ready: Callable[[], None] | None
) -> None:
    """Like ``server.run()``, with event subscribers: each in the health service, stopped with the server."""
    from ..events import Subscribers  # the events extra: only servers that host subscribers need it

    hosted = None
    try:
        async with _loop.stop_signals() as stop_requested:
            await server.start()
            try:
                hosted = Subscribers(*(await factory()), server=server, grace=server.config.grace_period)
                await hosted.start()
            except Exception as exc:  # noqa: BLE001 - the user's factory or the broker: one error, the server stops
                raise ConfigError(f"the subscribers did not start: {type(exc).__name__}: {exc}") from exc
            if on_ready is not None:
                on_ready()
            await stop_requested.wait()
    finally:
        # Both drain at once: subscribers stop fetching and finish their handlers while calls finish.
        await asyncio.gather(server.stop(), *(() if hosted is None else (hosted.stop(),)))


def _add_and_bind(server: Any, servicers: Sequence[Any], binds: Sequence[str]) -> None:
    for servicer in servicers:
        server.add(servicer)
    for address in binds:
        server.bind(address)


def with_reuseport(config: ServerConfig) -> ServerConfig:
    """``config`` whose servers share their port with the other workers (``grpc.so_reuseport`` = 1).

    A ``grpc_options`` entry replaces rpcframe's own (``so_reuseport`` 0,
    which keeps a single server from sharing a port silently).
    """
    return dataclasses.replace(config, grpc_options=(*config.grpc_options, *_REUSEPORT))


# -- the code API -------------------------------------------------------------------------


def _import(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{spec!r}: expected MODULE:OBJECT")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def serve(
    servicers: Any,
    bind: str | Sequence[str] = "127.0.0.1:50051",
    *,
    workers: int | Literal["auto"] = 1,
    config: ServerConfig | None = None,
    aio: bool | None = None,
    uvloop: bool = True,
    on_ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain; with ``workers`` > 1 one process per worker.

    ``servicers`` is what ``rpcframe serve`` takes: a servicer, a list of
    them, a class or factory, or a ``"MODULE:OBJECT"`` string naming one.
    With several workers it is resolved in each worker after the fork (a
    string is imported there, so SIGHUP's rolling restart serves new code;
    modules this process imported already are not reloaded). ``workers``:
    processes, ``"auto"`` for one per core; 1 serves in this process.
    ``on_ready`` gets the ``HOST:PORT`` addresses once every worker serves.
    Call it from the main thread (signals are handled there), before any
    grpc object exists in the process. Raises :class:`WorkerError` (an
    ``rpcframe.RpcframeError``) when the workers cannot start or keep
    crashing.

    Example::

        rpcframe.serve("shop.service:CatalogServicer", "0.0.0.0:50051", workers="auto")
    """
    count = cpu_count() if workers == "auto" else workers
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"workers must be >= 1 or 'auto', got {workers!r}")
    binds = [bind] if isinstance(bind, str) else list(bind)
    cfg = config or ServerConfig()
    if count == 1:
        found = servicers_of(_import(servicers) if isinstance(servicers, str) else servicers)
        serve_here(found, cfg, binds, aio=aio, uvloop=uvloop,
                   on_ready=None if on_ready is None else lambda ports: on_ready(announced(binds, ports)))  # fmt: skip
        return
    shared = with_reuseport(cfg)

    def main(addresses: list[str], ready: Callable[[], None]) -> None:
        found = servicers_of(_import(servicers) if isinstance(servicers, str) else servicers)
        serve_here(found, shared, addresses, aio=aio, uvloop=uvloop, on_ready=lambda ports: ready())

    Supervisor(main, binds, count, stop_within=stop_within(cfg)).run(on_ready)


def stop_within(config: ServerConfig) -> float:
    """Seconds a worker serving with ``config`` may take to drain before the supervisor kills it."""
    return config.drain_delay + config.grace_period + _STOP_MARGIN


def announced(binds: Sequence[str], ports: Sequence[int]) -> list[str]:
    """``HOST:PORT`` of each bind address with the port actually bound."""
    return [f"{address.rpartition(':')[0]}:{port}" for address, port in zip(binds, ports, strict=True)]


# -- the supervisor -------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    """One worker process as the supervisor sees it."""

    slot: int
    pid: int
    fd: int  # read end of the pipe the worker reports on ("ready", "error CODE MESSAGE")
    started: float
    ready: bool = False
    error: tuple[int, str] | None = None
    stopping: bool = False  # the supervisor sent SIGTERM
    status: int | None = None  # exit code once reaped (-N: killed by signal N)
    pending: bytes = b""

    @property
    def done(self) -> bool:
        """Exited (reaped)."""
        return self.status is not None


@dataclass
class _Slot:
    """A worker position: its current process and its run of failures."""

    worker: _Worker | None = None
    failures: int = 0
    restart_at: float | None = None


@dataclass
class _Signals:
    """What the signal handlers asked for."""

    stop: bool = False
    restart: bool = False
    previous: dict[int, Any] = field(default_factory=dict)
    wakeup: tuple[int, int] | None = None
    previous_wakeup: int = -1


class Supervisor:
    """Forks ``workers`` processes that each run ``main``, keeps them running, restarts and stops them.

    ``main(addresses, ready)`` runs in each worker: it serves on
    ``addresses`` (``binds`` with port 0 replaced by the port the
    supervisor reserved), calls ``ready()`` once serving, and returns after
    draining on SIGTERM. ``stop_within`` bounds a worker's drain before it
    is killed.
    """

    def __init__(self, main: WorkerMain, binds: Sequence[str], workers: int, *, stop_within: float = 30.0,
                 start_within: float = _START_WITHIN) -> None:  # fmt: skip
        if workers < 2:
            raise ConfigError(f"a supervisor runs 2 or more workers, got {workers!r}")
        if not sys.platform.startswith("linux"):
            raise ConfigError("several workers need Linux: elsewhere SO_REUSEPORT does not spread connections")
        for address in binds:
            if address.startswith(("unix:", "unix-abstract:")):
                raise ConfigError(f"{address}: several workers cannot share a unix socket (each bind replaces "
                                  "the socket file); bind HOST:PORT or run one worker")  # fmt: skip
        self._main = main
        self._binds = list(binds)
        self._slots = [_Slot() for _ in range(workers)]
        self._workers: dict[int, _Worker] = {}  # pid -> every worker not yet reaped
        self._stop_within = stop_within
        self._start_within = start_within
        self._held: list[socket.socket] = []
        self.addresses: list[str] = []
        self._signals = _Signals()
        self._serving = False  # every worker served once: from now on a dead one is restarted
        self._pid = os.getpid()

    # -- the supervisor's life -----------------------------------------------------------

    def run(self, on_ready: Callable[[list[str]], None] | None = None) -> int:
        """Start every worker, call ``on_ready(addresses)``, serve until SIGTERM/SIGINT; 0 once all drained.

        Raises :class:`WorkerError` when the workers cannot start (the first
        failing worker's message and exit code) or one slot crash-loops;
        ConfigError when an address cannot be reserved.
        """
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("several workers are supervised from the main thread (it handles the signals)")
        try:
            self.addresses = [self._reserve(address) for address in self._binds]
            self._install_signals()
            if not self._start_all():
                return self._drain()  # stopped while starting
            self._serving = True
            _LOG.info("%d workers serving on %s", len(self._slots), ", ".join(self.addresses))
            if on_ready is not None:
                on_ready(list(self.addresses))
            while not self._signals.stop:
                self._pump(1.0)
                if self._signals.restart:
                    self._signals.restart = False
                    self._rolling_restart()
            return self._drain()
        except BaseException:
            self._drain()
            raise
        finally:
            self._restore_signals()
            for sock in self._held:
                sock.close()

    def _reserve(self, address: str) -> str:
        """Hold ``address``'s port for the workers; the address with the real port.

        Bound without ``SO_REUSEPORT`` first, so a port any other socket
        holds (another server, another supervisor) is refused rather than
        shared; then marked shareable, so the workers can bind it too. It
        never listens: connections go to the workers' sockets only. Port 0
        is resolved here, once for every worker.
        """
        host, _, port_text = address.rpartition(":")
        try:
            port = int(port_text)
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]  # fmt: skip
        except (ValueError, OSError) as exc:
            raise ConfigError(f"cannot bind {address}: {exc}") from None
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError as exc:
            sock.close()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"cannot bind {address}: {reason}") from None
        self._held.append(sock)
        return f"{host}:{sock.getsockname()[1]}"

    def _start_all(self) -> bool:
        """Start every slot's worker and wait until all serve; False if asked to stop meanwhile."""
        workers = [self._spawn(slot) for slot in range(len(self._slots))]
        until = time.monotonic() + self._start_within
        while not all(w.ready for w in workers):
            if self._signals.stop:
                return False
            failed = next((w for w in workers if w.error is not None or w.done), None)
            if failed is not None:
                raise WorkerError(*self._failure(failed))
            if time.monotonic() > until:
                raise WorkerError(f"the workers did not start serving within {self._start_within:g}s")
            self._pump(0.5, restart=False)
        return True

    def _failure(self, worker: _Worker) -> tuple[str, int]:
        """Why ``worker`` failed to start: its own message and exit code when it sent one."""
        if worker.error is not None:
            code, message = worker.error
            return message, code
        return f"worker {worker.slot} exited ({_describe(worker.status)}) before it served", 1

    def _drain(self) -> int:
        """SIGTERM every worker and wait for them to drain, killing those past ``stop_within``; 1 if one was."""
        self._signals.stop = True
        for worker in self._workers.values():
            self._terminate(worker)
        until = time.monotonic() + self._stop_within
        while self._workers and time.monotonic() < until:
            self._pump(0.5, restart=False)
        killed = list(self._workers.values())
        for worker in killed:
            _LOG.error("worker %d (pid %d) still running %gs after SIGTERM: killed", worker.slot, worker.pid,
                       self._stop_within)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            os.waitpid(worker.pid, 0)
            self._forget(worker, -signal.SIGKILL)
        return 1 if killed else 0

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> _Worker:
        """Fork a worker for ``slot``; it becomes the slot's current one when it serves."""
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child (covered by the integration tests)
            os.close(read_fd)
            self._child(slot, write_fd)
        os.close(write_fd)
        worker = _Worker(slot, pid, read_fd, time.monotonic())
        self._workers[pid] = worker
        if self._slots[slot].worker is None:
            self._slots[slot].worker = worker
        _LOG.debug("worker %d started (pid %d)", slot, pid)
        return worker

    def _child(self, slot: int, write_fd: int) -> NoReturn:  # pragma: no cover - runs in the child
        """The worker process: run ``main`` and exit, never returning into the supervisor's code."""
        code = 1
        try:
            self._leave_supervisor()
            self._main(list(self.addresses), lambda: _send(write_fd, "ready"))
            code = 0
        except KeyboardInterrupt:
            code = 0  # SIGINT before the server took over the signal: nothing was served yet
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            code = getattr(exc, "exit_code", 1)
            expected = hasattr(exc, "exit_code") or isinstance(exc, ConfigError)
            if not expected:
                _LOG.exception("worker %d failed", slot)
            message = str(exc) if expected else f"{type(exc).__name__}: {exc}"
            _send(write_fd, f"error {code} {' '.join(message.split())}")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
                logging.shutdown()
        os._exit(code)

    def _leave_supervisor(self) -> None:  # pragma: no cover - runs in the child
        """In a new worker: drop the supervisor's signal handling and descriptors, die with it."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # Signals for the group (a terminal's Ctrl-C, `timeout`) reach the supervisor only: it stops each
        # worker once. A second SIGTERM during a drain would end the worker with its calls in flight.
        os.setpgid(0, 0)
        for sock in self._held:
            sock.close()
        for fd in [w.fd for w in self._workers.values()] + list(self._signals.wakeup or ()):
            with contextlib.suppress(OSError):
                os.close(fd)
        _die_with_parent()
        if os.getppid() != self._pid:
            os._exit(1)  # the supervisor died before we could ask to follow it

    def _terminate(self, worker: _Worker) -> None:
        if not worker.stopping and not worker.done:
            worker.stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)

    def _pump(self, timeout: float, *, restart: bool = True) -> None:
        """Wait up to ``timeout`` for a worker's report, an exit or a signal; handle what came."""
        fds = [w.fd for w in self._workers.values() if w.fd >= 0]
        wakeup = self._signals.wakeup[0] if self._signals.wakeup else -1
        if restart:
            due = [s.restart_at for s in self._slots if s.restart_at is not None]
            if due:
                timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        readable, _, _ = select.select([*fds, *([wakeup] if wakeup >= 0 else [])], [], [], timeout)
        for fd in readable:
            if fd == wakeup:
                with contextlib.suppress(BlockingIOError):
                    os.read(wakeup, 512)
            else:
                self._read(next(w for w in self._workers.values() if w.fd == fd))
        self._reap()
        if restart:
            self._restart_due()

    def _read(self, worker: _Worker) -> None:
        data = os.read(worker.fd, 4096)
        if not data:  # the worker closed its end: it is exiting
            os.close(worker.fd)
            worker.fd = -1
            return
        worker.pending += data
        *lines, worker.pending = worker.pending.split(b"\n")
        for line in lines:
            kind, _, rest = line.decode(errors="replace").partition(" ")
            if kind == "ready":
                worker.ready = True
                if self._serving:  # a replacement (the first ones are announced together)
                    _LOG.info("worker %d (pid %d) serving", worker.slot, worker.pid)
            elif kind == "error":
                code, _, message = rest.partition(" ")
                worker.error = (int(code) if code.lstrip("-").isdigit() else 1, message)

    def _reap(self) -> None:
        for worker in list(self._workers.values()):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid:
                self._forget(worker, os.waitstatus_to_exitcode(status))

    def _forget(self, worker: _Worker, code: int) -> None:
        """``worker`` exited with ``code``: schedule its slot's restart unless the supervisor stopped it."""
        worker.status = code
        self._workers.pop(worker.pid, None)
        if worker.fd >= 0:
            os.close(worker.fd)
            worker.fd = -1
        slot = self._slots[worker.slot]
        if worker.stopping or slot.worker is not worker or not self._serving or self._signals.stop:
            # Asked to stop, replaced, or still starting up (_start_all and _rolling_restart report those).
            _LOG.info("worker %d (pid %d) exited (%s)", worker.slot, worker.pid, _describe(code))
            return
        uptime = time.monotonic() - worker.started
        slot.failures = 1 if uptime >= _STABLE else slot.failures + 1
        why = "" if worker.error is None else f": {worker.error[1]}"
        if slot.failures >= _CRASH_LOOP:
            raise WorkerError(f"worker {worker.slot} failed {slot.failures} times in a row, the last time "
                              f"{_describe(code)} {uptime:.1f}s after it started{why}; stopping")  # fmt: skip
        delay = min(_BACKOFF[0] * 2 ** (slot.failures - 1), _BACKOFF[1])
        _LOG.warning("worker %d (pid %d) exited (%s) after %.1fs%s; restarting it in %.1fs", worker.slot,
                     worker.pid, _describe(code), uptime, why, delay)  # fmt: skip
        slot.worker = None
        slot.restart_at = time.monotonic() + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, slot in enumerate(self._slots):
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                self._spawn(index)

    def _wait(self, done: Callable[[], bool], within: float) -> bool:
        """Pump until ``done()`` (True), ``within`` s passed or a stop was asked (False)."""
        until = time.monotonic() + within
        while not done():
            if self._signals.stop or time.monotonic() > until:
                return False
            self._pump(min(0.5, max(0.0, until - time.monotonic())))
        return True

    def _rolling_restart(self) -> None:
        """Replace each worker in turn: start the new one, wait until it serves, then drain the old one."""
        started = time.monotonic()
        _LOG.info("SIGHUP: restarting %d workers one at a time", len(self._slots))
        for index, slot in enumerate(self._slots):
            old = slot.worker
            # A dead slot waits for its restart, which runs new code anyway.
            if old is not None and not self._replace(index, old):
                return
        _LOG.info("rolling restart done in %.1fs", time.monotonic() - started)

    def _replace(self, index: int, old: _Worker) -> bool:
        """Start slot ``index``'s new worker and, once it serves, drain ``old``; False to stop the restart."""
        new = self._spawn(index)
        if not self._wait(lambda: new.ready or new.error is not None or new.done, self._start_within):
            self._terminate(new)
            if not self._signals.stop:
                _LOG.error("rolling restart stopped: a new worker %d did not serve within %gs; the old workers "
                           "keep serving", index, self._start_within)  # fmt: skip
            return False
        if not new.ready:
            self._terminate(new)
            _LOG.error("rolling restart stopped: the new worker %d failed (%s); the old workers keep serving",
                       index, self._failure(new)[0])  # fmt: skip
            return False
        slot = self._slots[index]
        slot.worker, slot.failures, slot.restart_at = new, 0, None
        self._terminate(old)
        if not self._wait(lambda: old.done, self._stop_within):
            if not self._signals.stop:
                _LOG.error("worker %d (pid %d) still running %gs after SIGTERM: killed", index, old.pid,
                           self._stop_within)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.kill(old.pid, signal.SIGKILL)
            return False
        _LOG.info("worker %d replaced (pid %d -> %d)", index, old.pid, new.pid)
        return True

    # -- signals ---------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._signals.wakeup = (read_fd, write_fd)
        self._signals.previous_wakeup = signal.set_wakeup_fd(write_fd)

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self._signals.stop = True

        def on_restart(signum: int, frame: FrameType | None) -> None:
            self._signals.restart = True

        handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_restart,
                    signal.SIGCHLD: lambda signum, frame: None}  # fmt: skip  # SIGCHLD: wakes select()
        self._signals.previous = {s: signal.signal(s, handler) for s, handler in handlers.items()}

    def _restore_signals(self) -> None:
        if self._signals.wakeup is None:
            return
        for signum, handler in self._signals.previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._signals.previous_wakeup)
        for fd in self._signals.wakeup or ():
            os.close(fd)
        self._signals.wakeup = None


def _send(fd: int, line: str) -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(OSError):
        os.write(fd, (line + "\n").encode())


def _describe(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to send this worker SIGTERM when the supervisor dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
