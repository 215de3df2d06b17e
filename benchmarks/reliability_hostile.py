"""Hostile clients against each kind of server (reliability scenario 5).

For every attack of :mod:`benchmarks.hostile` and every server (rpcframe
sync and asyncio through ``rpcframe serve``, raw grpcio sync and grpc.aio):
what the attacker got and whether within 5 s, whether a normal call on a new
connection answers right after (the attacker still connected), and the
server's RSS before, at its peak, and after the attacker disconnected. After
a failed case the server is restarted, so the next attack starts from a
clean baseline; when the RSS did not come back, the attack is repeated once
to tell memory kept for reuse (level) from a leak (grows again).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import grpc

from benchmarks import hostile
from benchmarks.reliability_procs import Backend, Sampler, server_args, start_all, stats
from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

#: RSS after the attacker left may exceed RSS before by this share at most.
RSS_SLACK = 0.10
#: Seconds the RSS gets to come back within the slack after the attacker left.
RSS_SETTLE = 2.0
NORMAL_CALL_TIMEOUT = hostile.ANSWER_WITHIN

ATTACKS: list[tuple[str, Callable[[str], hostile.Attack]]] = [
    ("TCP garbage (64 KiB)", hostile.tcp_garbage),
    ("HTTP/1.1 request", hostile.http1_request),
    ("truncated gRPC frames, END_STREAM", hostile.truncated_frames),
    ("oversize message (4 MiB + 1 KiB)", hostile.oversize_message),
    ("header flood: 2000 x 64 B", functools.partial(hostile.header_flood, count=2000, size=64)),
    ("header flood: one 1 MiB header", functools.partial(hostile.header_flood, count=1, size=hostile.MiB)),
    ("header flood: 1 MiB before SETTINGS ack",
     functools.partial(hostile.header_flood, count=1, size=hostile.MiB, early=True)),
    ("16 unread server streams", functools.partial(hostile.unread_streams, count=16, messages=100_000, size=16384)),
    ("64 unread server streams", functools.partial(hostile.unread_streams, count=64, messages=100_000, size=16384)),
    ("10k-stream flood, never read",
     functools.partial(hostile.unread_streams, count=10_000, messages=100, size=1024)),
    ("2000 idle TCP connections", hostile.idle_connections),
]  # fmt: skip


def normal_call(address: str) -> dict[str, Any]:
    """One unary call on a new raw grpc channel: its status and how long it took."""
    start = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        try:
            bench_pb2_grpc.BenchServiceStub(channel).Unary(bench_pb2.BenchRequest(), timeout=NORMAL_CALL_TIMEOUT)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    return {"code": code, "seconds": round(time.monotonic() - start, 3)}


def _settled_rss(pid: int, before: int, within: float) -> int | None:
    """RSS (KiB) once within the slack of ``before``, or the last one seen after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        sample = stats(pid)
        if sample is None or sample.rss_kib <= before * (1 + RSS_SLACK) or time.monotonic() >= deadline:
            return None if sample is None else sample.rss_kib
        time.sleep(0.1)  # paced poll, bounded by the deadline


def _attack(fn: Callable[[str], hostile.Attack], address: str) -> hostile.Attack:
    try:
        return fn(address)
    except Exception as exc:  # an attacker that fails outright is reported, not fatal
        return hostile.Attack(False, f"attacker error: {exc!r}", 0.0)


def hostile_case(backend: Backend, fn: Callable[[str], hostile.Attack]) -> dict[str, Any]:
    """One attack on a running backend, measured."""
    pid, address = backend.pid, backend.address
    before = stats(pid)
    tracebacks = backend.tracebacks()
    sampler = Sampler([pid], interval=0.05)
    attack = _attack(fn, address)
    during = normal_call(address)
    held = len(attack.sockets)
    closed = hostile.closed_by_server(attack.sockets)
    attack.close()
    after_call = normal_call(address)
    after = _settled_rss(pid, before.rss_kib, RSS_SETTLE) if before else None
    peak = sampler.stop()[pid]
    alive = backend.alive()
    rss_ok = before is not None and after is not None and after <= before.rss_kib * (1 + RSS_SLACK)
    case = {
        "answered": attack.answered,
        "result": attack.result + (f"; {closed} closed by the server" if held > 1 else ""),
        "attack_s": round(attack.seconds, 2),
        "call_during": during,
        "call_after": after_call,
        "alive": alive,
        "rss_mib": [_mib(before.rss_kib if before else None), _mib(peak), _mib(after)],
        "rss_ok": rss_ok,
        "tracebacks": backend.tracebacks() - tracebacks,
        "pass": attack.answered is not False and alive and during["code"] == "OK" and rss_ok,
    }
    if alive and not rss_ok and before is not None:
        case["rss_after_repeat_mib"] = _repeat_rss(backend, fn, before.rss_kib)
    return case


def _repeat_rss(backend: Backend, fn: Callable[[str], hostile.Attack], before: int) -> float | None:
    """RSS after the same attack once more: memory kept for reuse stays level, a leak grows again."""
    _attack(fn, backend.address).close()
    return _mib(_settled_rss(backend.pid, before, RSS_SETTLE))


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _healthy(backend: Backend) -> bool:
    return backend.alive() and normal_call(backend.address)["code"] == "OK"


def hostile_server(stack: str, front: str) -> dict[str, Any]:
    """Every attack, in turn, on one server of ``stack``/``front`` (restarted when it stops answering)."""
    args = server_args(stack, front)
    backend = start_all([(args, f"hostile-{stack}-{front}", None)])[0]
    results: dict[str, Any] = {}
    try:
        for _ in range(20):  # warm-up: the first calls allocate what every later call reuses
            normal_call(backend.address)
        for name, fn in ATTACKS:
            results[name] = case = hostile_case(backend, fn)
            print(f"  hostile {stack:<8} {front:<4} {name:<42} pass={case['pass']} {case['result'][:90]}",
                  flush=True)  # fmt: skip
            if not case["pass"] or not _healthy(backend):
                # A fresh server for the next attack: its baseline is not this one's aftermath.
                case["restarted"] = True
                backend.stop()
                backend = start_all([(args, f"hostile-{stack}-{front}", None)])[0]
    finally:
        backend.stop()
    return results
