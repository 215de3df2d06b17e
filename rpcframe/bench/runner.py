"""Run a load in this process or in several load-generator processes, and merge.

``run_bench(spec)`` runs the load here. With ``procs=K`` (or
``isolate=True``), K processes (multiprocessing, *spawn*: grpc does not
survive fork) each run their share of the load (:meth:`LoadSpec.split`);
they connect and warm up, meet at a barrier, measure, meet at a second
barrier, and send back their HDR-encoded histograms, which are merged here.
The caller's ``on_measure_start``/``on_measure_end`` hooks run at those
barriers, e.g. to sample the server's CPU time for exactly the measured
phase.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .engine import LoadRun
from .histogram import Merged, Partial, merge
from .spec import BenchError, LoadSpec

__all__ = ["BenchResult", "ProgressFn", "run_bench"]

#: progress(phase, calls completed in the measured phase, seconds measured so far);
#: phase is "connecting", "warmup", "measuring" or "done".
ProgressFn = Callable[[str, int, float], None]

# Seconds a spawned process may take to start Python and import grpc.
_SPAWN_SLACK = 60.0
_END_SLACK = 30.0
_REPORT_EVERY = 0.2


@dataclass(slots=True)
class BenchResult:
    """The merged outcome of a load run.

    Attributes:
        spec: the whole load (before it was split among processes).
        procs: load-generator processes that ran it.
        merged: counts, histogram, timeline and CPU of every process.
        started_at: wall-clock time (``time.time()``) the run started.
    """

    spec: LoadSpec
    procs: int
    merged: Merged
    started_at: float

    @property
    def calls(self) -> int:
        """Calls finished in the measured phase, OK or not."""
        return self.merged.ok + self.merged.failed

    @property
    def qps(self) -> float:
        """Calls finished per second of the measured phase."""
        return self.calls / self.merged.elapsed if self.merged.elapsed > 0 else 0.0

    @property
    def messages_per_s(self) -> float:
        """Stream messages (see :class:`~rpcframe.bench.histogram.Recorder`) per second."""
        return self.merged.messages / self.merged.elapsed if self.merged.elapsed > 0 else 0.0

    @property
    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the load generator(s) in the measured phase."""
        return self.merged.cpu_user + self.merged.cpu_system

    @property
    def cpu_us_per_call(self) -> float:
        """Load-generator CPU µs per finished call."""
        return self.cpu_seconds * 1e6 / self.calls if self.calls else 0.0

    @property
    def cpu_us_per_message(self) -> float:
        """Load-generator CPU µs per stream message."""
        return self.cpu_seconds * 1e6 / self.merged.messages if self.merged.messages else 0.0

    @property
    def status(self) -> dict[str, int]:
        """Calls by final status name, OK included."""
        counts = {"OK": self.merged.ok} if self.merged.ok else {}
        counts.update(sorted(self.merged.status.items(), key=lambda kv: -kv[1]))
        return counts


def run_bench(
    spec: LoadSpec,
    *,
    procs: int = 1,
    isolate: bool = False,
    on_measure_start: Callable[[], None] | None = None,
    on_measure_end: Callable[[], None] | None = None,
    progress: ProgressFn | None = None,
) -> BenchResult:
    """Run ``spec`` and return the merged result.

    Args:
        spec: the load.
        procs: load-generator processes (>1 splits the load among them).
        isolate: run even a single load generator in its own process.
        on_measure_start: called right before the measured phase.
        on_measure_end: called right after it.
        progress: called every 0.2 s from a helper thread.
    """
    if procs < 1:
        raise BenchError(f"procs must be >= 1, got {procs}")
    started = time.time()
    if procs == 1 and not isolate:
        run = LoadRun(spec, on_measure_start=on_measure_start, on_measure_end=on_measure_end)

        def sample() -> tuple[str, int, float]:
            start = run.measure_start
            return run.phase, run.completed(), 0.0 if start is None else time.perf_counter() - start

        with _reporting(progress, sample):
            partial = run.run()
        return BenchResult(spec, 1, merge([partial]), started)
    return _run_processes(spec, procs, on_measure_start, on_measure_end, progress, started)


@contextlib.contextmanager
def _reporting(progress: ProgressFn | None, sample: Callable[[], tuple[str, int, float]]) -> Iterator[None]:
    """Call ``progress`` with ``sample()`` periodically while the block runs."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(_REPORT_EVERY):
            progress(*sample())

    thread = threading.Thread(target=loop, daemon=True, name="rpcframe-bench-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)


def _run_processes(
    spec: LoadSpec,
    procs: int,
    on_start: Callable[[], None] | None,
    on_end: Callable[[], None] | None,
    progress: ProgressFn | None,
    started: float,
) -> BenchResult:
    ctx = multiprocessing.get_context("spawn")
    parts = spec.split(procs)
    n = len(parts)
    start_barrier = ctx.Barrier(n + 1)
    end_barrier = ctx.Barrier(n + 1)
    counts = ctx.RawArray("q", n)
    results: Any = ctx.Queue()
    start_timeout = spec.connect_timeout + spec.warmup + _SPAWN_SLACK
    end_timeout = spec.time_limit + spec.call_timeout + _END_SLACK
    shared = (start_barrier, end_barrier, counts, results, start_timeout, end_timeout)
    processes = [
        ctx.Process(target=_child, name=f"rpcframe-bench-{i}", daemon=True, args=(i, part, *shared))
        for i, part in enumerate(parts)
    ]
    phase = ["connecting"]
    measuring_since: list[float] = []

    def sample() -> tuple[str, int, float]:
        return phase[0], sum(counts), time.perf_counter() - measuring_since[0] if measuring_since else 0.0

    try:
        for process in processes:
            process.start()
        with _reporting(progress, sample):
            try:
                start_barrier.wait(start_timeout)
            except threading.BrokenBarrierError:
                raise _child_failure(results, processes, "load generators did not get ready") from None
            if on_start is not None:
                on_start()
            measuring_since.append(time.perf_counter())
            phase[0] = "measuring"
            try:
                end_barrier.wait(end_timeout)
            except threading.BrokenBarrierError:
                raise _child_failure(results, processes, "load generators did not finish") from None
            if on_end is not None:
                on_end()
            phase[0] = "done"
            partials = _collect(results, n)
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():  # pragma: no cover - ignores SIGTERM
                process.kill()
                process.join()
        results.close()
        results.join_thread()
    return BenchResult(spec, n, merge(partials), started)


def _collect(results: Any, n: int) -> list[Partial]:
    partials: list[Partial | None] = [None] * n
    for _ in range(n):
        try:
            index, partial, error = results.get(timeout=_END_SLACK)
        except queue.Empty:
            raise BenchError("a load generator process sent no result") from None
        if error is not None:
            raise BenchError(error)
        partials[index] = partial
    return [p for p in partials if p is not None]


def _child_failure(results: Any, processes: list[Any], fallback: str) -> BenchError:
    """The most telling error the child processes reported."""
    errors: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(errors) < len(processes):
        try:
            _, _, error = results.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if error is not None:
            errors.append(error)
    # A process that only saw the barrier break is a bystander.
    real = [e for e in errors if "BrokenBarrierError" not in e]
    if real:
        return BenchError(real[0])
    dead = [p for p in processes if p.exitcode not in (None, 0)]
    if dead:
        return BenchError(f"{fallback}: load generator exited with code {dead[0].exitcode}")
    return BenchError(fallback)


def _child(
    index: int,
    spec: LoadSpec,
    start_barrier: Any,
    end_barrier: Any,
    counts: Any,
    results: Any,
    start_timeout: float,
    end_timeout: float,
) -> None:
    """A load-generator process: run one share of the load, send back a Partial."""
    run = LoadRun(spec, on_measure_start=lambda: start_barrier.wait(start_timeout),
                  on_measure_end=lambda: end_barrier.wait(end_timeout))  # fmt: skip
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(_REPORT_EVERY):
            counts[index] = run.completed()

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        partial = run.run()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as text
        start_barrier.abort()
        end_barrier.abort()
        message = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
        results.put((index, None, message))
        return
    finally:
        stop.set()
    counts[index] = partial.ok + partial.failed
    results.put((index, partial, None))
