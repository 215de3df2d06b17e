"""Backend faults under load (reliability scenarios 1-4): kill -9, SIGSTOP/SIGCONT, SIGTERM.

Each run starts logged BenchService backends (``benchmarks.reliability_servers``)
as separate processes, puts 16 calls in flight (:data:`MIX`: idempotent unary
calls and server streams, and non-idempotent ``Record`` calls), hits one
backend, and then matches what the callers saw with what the backends
executed: calls sent and failed, request ids executed twice (duplicates) and
executions that started after the caller's deadline had passed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.reliability_load import KINDS, Load, Tally
from benchmarks.reliability_procs import Backend, Sampler, executions, server_args, start_all, stats, stop_all

#: Callers per kind of call (see reliability_load.KINDS): 16 in flight.
MIX = {"unary": 6, "stream": 5, "record": 4, "refused": 1}


@dataclass(frozen=True)
class FaultTimes:
    """Seconds of each phase (quick and full modes differ)."""

    pre: float  # load before the fault
    post: float  # load after it
    stopped: float  # SIGSTOP to SIGCONT
    kill_timeout: float  # call deadline in the kill -9 and SIGTERM runs
    stop_timeout: float  # call deadline in the SIGSTOP runs (shorter than ``stopped``: calls caught there expire)
    reps: int  # kill -9 and SIGSTOP runs, each with fresh backends
    sigterm_reps: int
    term_pre: float
    term_post: float


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def kind_of(rid: str) -> str:
    """The kind of call a request id names (``TAG.KIND<caller>.<n>``)."""
    return rid.split(".")[1].rstrip("0123456789")


def summarize(tally: Tally, done: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Per kind of call: what the callers saw next to what the backends executed."""
    ran_all = {rid: times for logged in done.values() for rid, times in logged.items() if rid in tally.deadlines}
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        ran = {rid: times for rid, times in ran_all.items() if kind_of(rid) == kind}
        prefix = f"{kind} "
        out[kind] = {
            "sent": tally.sent[kind],
            "failed": tally.failed[kind],
            "codes": {code[len(prefix):]: n for code, n in tally.codes.items() if code.startswith(prefix)},
            "executed": len(ran),
            "duplicated": sum(len(times) > 1 for times in ran.values()),
            "extra_executions": sum(len(times) - 1 for times in ran.values()),
            "late": sum(t > tally.deadlines[rid] for rid, times in ran.items() for t in times),
            # The caller saw a failure, yet the backend ran it: a non-idempotent caller cannot tell.
            "failed_but_executed": sum(rid not in tally.ok_ids for rid in ran),
            # A success no backend logged: the logging is broken (a sanity check, expected 0).
            "ok_not_executed": sum(kind_of(rid) == kind and rid not in ran for rid in tally.ok_ids),
        }
    return out


def _add(total: dict[str, dict[str, Any]], run: dict[str, dict[str, Any]]) -> None:
    for kind, numbers in run.items():
        into = total.setdefault(kind, {"codes": {}})
        for key, value in numbers.items():
            if key == "codes":
                for code, n in value.items():
                    into["codes"][code] = into["codes"].get(code, 0) + n
            else:
                into[key] = into.get(key, 0) + value


def _one_fault(kind: str, stack: str, front: str, times: FaultTimes, workdir: Path, rep: int) -> dict[str, Any]:
    """3 backends, 16 calls in flight, one backend killed (``kill``) or stopped for a while (``stop``)."""
    tag = f"{kind}-{stack}-{front}-{rep}"
    logs = [workdir / f"{tag}-b{i}.log" for i in range(3)]
    backends = start_all([(server_args(stack, front, logged=True), f"b{i}", logs[i]) for i in range(3)])
    victim, survivor = backends[0], backends[1]
    try:
        before = stats(survivor.pid)
        sampler = Sampler([survivor.pid])
        timeout = times.stop_timeout if kind == "stop" else times.kill_timeout
        load = Load(stack, front, [b.address for b in backends], MIX, timeout, tag)
        load.start()
        try:
            time.sleep(times.pre)
            if kind == "kill":
                victim.signal(signal.SIGKILL)
            else:
                victim.signal(signal.SIGSTOP)
                time.sleep(times.stopped)
                victim.signal(signal.SIGCONT)
            time.sleep(times.post)
        finally:
            tally = load.stop()
            peak = sampler.stop()[survivor.pid]
        after = stats(survivor.pid)
        alive = all(b.alive() for b in backends[1:]) and (kind == "kill" or victim.alive())
    finally:
        stop_all(backends)
    return {
        "kinds": summarize(tally, executions(logs)),
        "alive": alive,
        "rss_mib": [_mib(before.rss_kib if before else None), _mib(peak), _mib(after.rss_kib if after else None)],
        "served_by": dict(tally.served_by),
    }


def fault_runs(kind: str, stack: str, front: str, times: FaultTimes, workdir: Path) -> dict[str, Any]:
    """``times.reps`` runs of :func:`_one_fault`, added up (RSS and liveness from the last / all)."""
    total: dict[str, Any] = {"kinds": {}, "alive": True, "runs": []}
    for rep in range(times.reps):
        run = _one_fault(kind, stack, front, times, workdir, rep)
        _add(total["kinds"], run["kinds"])
        total["alive"] = total["alive"] and run["alive"]
        total["rss_mib"] = run["rss_mib"]
        total["runs"].append({"served_by": run["served_by"], "rss_mib": run["rss_mib"]})
        print(f"  {kind:<7} {stack:<8} {front:<4} run {rep + 1}: {_line(run['kinds'])}", flush=True)
    return total


def _line(kinds: dict[str, dict[str, Any]]) -> str:
    return "  ".join(f"{k} {v['sent']}/{v['failed']}/{v['duplicated']}/{v['late']}" for k, v in kinds.items())


def _term_rep(stack: str, front: str, survivor: Backend, times: FaultTimes, log: Path, rep: int) -> dict[str, Any]:
    """One SIGTERM: a fresh victim beside the survivor, load on both, SIGTERM the victim, keep going."""
    victim = start_all([(server_args(stack, front, logged=True), f"victim{rep}", log)])[0]
    try:
        load = Load(stack, front, [survivor.address, victim.address], MIX, times.kill_timeout,
                    f"term-{stack}-{front}-{rep}")  # fmt: skip
        load.start()
        try:
            time.sleep(times.term_pre)
            victim.signal(signal.SIGTERM)
            exit_s = victim.wait_exit()
            time.sleep(times.term_post)
        finally:
            tally = load.stop()
        return {"tally": tally, "exit_code": victim.proc.returncode, "exit_s": exit_s,
                "victim_served": tally.served_by[victim.name]}  # fmt: skip
    finally:
        victim.stop()


def sigterm_runs(stack: str, front: str, times: FaultTimes, workdir: Path) -> dict[str, Any]:
    """``times.sigterm_reps`` SIGTERMs of 1 of 2 backends under load (default ``rpcframe serve`` settings)."""
    logs = [workdir / f"term-{stack}-{front}-survivor.log", workdir / f"term-{stack}-{front}-victims.log"]
    survivor = start_all([(server_args(stack, front, logged=True), "survivor", logs[0])])[0]
    total, reps = Tally(), []
    try:
        before = stats(survivor.pid)
        sampler = Sampler([survivor.pid])
        try:
            for rep in range(times.sigterm_reps):
                result = _term_rep(stack, front, survivor, times, logs[1], rep)
                tally = result.pop("tally")
                total.merge(tally)
                reps.append(result)
                print(f"  sigterm {stack:<8} {front:<4} rep {rep + 1}: failed {dict(tally.failed)} "
                      f"victim exit {result['exit_code']} in {result['exit_s']}s, served {result['victim_served']}",
                      flush=True)  # fmt: skip
        finally:
            peak = sampler.stop()[survivor.pid]
        after = stats(survivor.pid)
        alive = survivor.alive()
    finally:
        survivor.stop()
    exits = [r["exit_s"] for r in reps]
    return {
        "kinds": summarize(total, executions(logs)),
        "alive": alive,
        "rss_mib": [_mib(before.rss_kib if before else None), _mib(peak), _mib(after.rss_kib if after else None)],
        "victim_exit_codes": sorted({r["exit_code"] for r in reps}, key=str),
        "victim_exit_s_max": None if None in exits else round(max(exits, default=0.0), 2),
        "victim_served": [r["victim_served"] for r in reps],
    }


def scenarios(times: FaultTimes, workdir: Path, stacks: tuple[str, ...], fronts: tuple[str, ...],
              guard: Callable[[Callable[[], dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Every fault scenario for every stack and front; ``guard`` turns a crashed run into an error entry."""
    out: dict[str, Any] = {"kill": {}, "stop": {}, "sigterm": {}}
    for front in fronts:
        for stack in stacks:
            key = f"{stack}/{front}"
            out["kill"][key] = guard(lambda: fault_runs("kill", stack, front, times, workdir))  # noqa: B023
            out["stop"][key] = guard(lambda: fault_runs("stop", stack, front, times, workdir))  # noqa: B023
            out["sigterm"][key] = guard(lambda: sigterm_runs(stack, front, times, workdir))  # noqa: B023
    return out
