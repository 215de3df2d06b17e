"""Handing memory that a burst of connections left behind back to the OS (glibc only).

When many connections close (2000 idle ones: about 25 MiB), grpc frees
their memory, but glibc keeps the freed pages in its arenas: without help
the server's RSS stays at the burst's peak for good. ``malloc_trim(0)``
returns every whole free page. One daemon thread per process, running while
a server runs, checks every :data:`INTERVAL` seconds how much of the RSS
malloc's live allocations do not explain (the *slack*: free heap pages
still resident, plus Python's own arenas and the like) and trims once the
slack has grown by :data:`GROWTH` since the last trim and stopped growing
(a burst of closes is over). Memory still in use (connections still open)
is not slack, so the trim waits until it is freed.

Not all of it comes back: grpc keeps a small record of every connection it
ever polled (``Epoll1EventHandle``, reused for the next connections), and
those records sit between the freed blocks, so pages holding one stay
resident. A second burst of the same size reuses them instead of growing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable

#: Seconds between two checks of the slack.
INTERVAL = 0.5
#: Bytes the slack must grow by since the last trim before the next one.
GROWTH = 4 << 20
#: The slack counts as settled (nothing is being freed) once it grew less than this since the check before.
SETTLED = 1 << 20


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


def _glibc() -> tuple[Callable[[int], int], Callable[[], _MallInfo2]] | None:
    """``malloc_trim`` and ``mallinfo2`` when the process runs on glibc >= 2.33 on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "malloc_trim", "mallinfo2")):
        return None  # not glibc (musl has no malloc_trim), or glibc < 2.33
    trim, info = libc.malloc_trim, libc.mallinfo2
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info.argtypes, info.restype = [], _MallInfo2
    return trim, info


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """This process's resident memory in bytes (0 if /proc cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class HeapTrimmer:
    """Trims the heap once the slack grew by :data:`GROWTH`; servers hold it while they run.

    :meth:`acquire` when a server starts and :meth:`release` when it stops:
    the checking thread runs while at least one holder does. A check reads
    the RSS (cheap); only when the RSS is :data:`GROWTH` above its lowest
    point since the last trim does it ask malloc for its live bytes (which
    walks malloc's free lists) to tell memory in use from memory freed.
    ``trims`` counts the trims done.
    """

    def __init__(self, trim: Callable[[int], int], info: Callable[[], _MallInfo2]) -> None:
        self._trim, self._info = trim, info
        self._lock = threading.Lock()
        self._checking = threading.Lock()  # a thread ending and its successor may overlap
        self._holders = 0
        self._stop: threading.Event | None = None
        # The lowest RSS and slack seen since the last trim; the slack at the check before.
        self._rss_floor = self._slack_floor = 0
        self._last_slack: int | None = None
        self.trims = 0

    def acquire(self) -> None:
        """A server started: run the check (from now on) until every holder released it."""
        with self._lock:
            self._holders += 1
            if self._stop is None:
                self._reset()
                self._stop = stop = threading.Event()
                threading.Thread(target=self._run, args=(stop,), name="rpcframe-heap-trim", daemon=True).start()

    def release(self) -> None:
        """A server stopped: the thread ends with the last holder."""
        with self._lock:
            self._holders = max(0, self._holders - 1)
            if self._holders == 0 and self._stop is not None:
                self._stop.set()
                self._stop = None

    def _slack(self, rss: int) -> int:
        """Resident bytes that no live malloc allocation accounts for."""
        info = self._info()
        return rss - int(info.uordblks) - int(info.hblkhd)

    def _reset(self) -> None:
        self._rss_floor = rss = _rss()
        self._slack_floor = self._slack(rss)
        self._last_slack = None

    def check(self) -> bool:
        """Trim if the slack grew by :data:`GROWTH` since the last trim; whether it did."""
        with self._checking:
            rss = _rss()
            if rss - self._rss_floor < GROWTH:  # no room for that much freed memory: skip malloc's walk
                self._rss_floor = min(self._rss_floor, rss)
                self._last_slack = None
                return False
            slack = self._slack(rss)
            last, self._last_slack = self._last_slack, slack
            if slack - self._slack_floor < GROWTH:  # the growth is memory in use (connections still open)
                self._slack_floor = min(self._slack_floor, slack)
                return False
            if last is None or slack - last > SETTLED:
                return False  # memory is being freed right now (connections closing): trim once that is over
            self._trim(0)
            self.trims += 1
            self._reset()
            return True

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(INTERVAL):
            self.check()


_found = _glibc()
#: The process's trimmer; None where malloc_trim/mallinfo2 are missing (not glibc, glibc < 2.33).
TRIMMER = None if _found is None else HeapTrimmer(*_found)


def hold() -> None:
    """Keep the heap trimmed while the caller (a server) runs; a no-op without glibc."""
    if TRIMMER is not None:
        TRIMMER.acquire()


def unhold() -> None:
    """The caller (a server) stopped."""
    if TRIMMER is not None:
        TRIMMER.release()
