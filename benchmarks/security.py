"""What security costs: TLS, mTLS and JWT-verified calls vs plaintext, in one run.

::

    python -m benchmarks.security            # 5 rounds of 4 s per variant
    python -m benchmarks.security --quick    # 3 rounds of 1 s
    python -m benchmarks.security --out /tmp/sec   # results elsewhere

Variants, all rpcframe asyncio server and client on uvloop, unary 64 B
``BenchService/Unary`` with 64 calls in flight:

- ``plain``: plaintext, no auth (the baseline);
- ``tls``: server TLS, the client verifies the server;
- ``mtls``: TLS with client certificates, the caller's identity checked;
- ``jwt``: plaintext (loopback), RS256 bearer token verified by the server
  (``AuthConfig.jwt``) plus a one-rule policy. The server caches a verified
  token until it expires, so a steady client pays the signature once; this
  measures what every call still pays (metadata scan, cache hit, policy).

Each variant's server is its own process (``python -m benchmarks.security
--serve VARIANT``), started once, stopped by PID at the end; each measured
run is a fresh load-generator process (``--load VARIANT``). Server CPU is
read from ``/proc/PID/stat`` over exactly the measured phase (the load
process prints ``measuring`` when its warm-up ends). Rounds alternate the
order of variants. Reported: median [min-max] over rounds of QPS and CPU
µs per call, and of each round's ratio variant / plain. Certificates and
keys are made at run time in a temporary directory, never stored.

Results: ``benchmarks/results/security.json`` and ``security.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = ("plain", "tls", "mtls", "jwt")
CONCURRENCY = 64
ISSUER, AUDIENCE = "https://bench.issuer", "rpcframe-bench"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
RUN_TIMEOUT = 120.0


# -- test material (made at run time) ---------------------------------------------


def make_material(directory: Path) -> None:
    """A CA, server and client certificates, an RS256 key pair and a token, as files in ``directory``."""
    import jwt
    import trustme
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("bench-client.test")
    files = {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": b"".join(p.bytes() for p in server.cert_chain_pems),
        "server.key": server.private_key_pem.bytes(),
        "client.pem": b"".join(p.bytes() for p in client.cert_chain_pems),
        "client.key": client.private_key_pem.bytes(),
    }
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files["jwt-public.pem"] = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "bench", "exp": int(time.time()) + 24 * 3600}
    files["token"] = jwt.encode(claims, private, algorithm="RS256").encode()
    for name, data in files.items():
        (directory / name).write_bytes(data)


def server_config(variant: str, material: Path) -> Any:
    """The ServerConfig of one variant."""
    import rpcframe
    from rpcframe.security import AuthConfig, JWTConfig, JWTKey, Policy, Rule, TLSConfig

    cert, key, ca = material / "server.pem", material / "server.key", material / "ca.pem"
    if variant == "tls":
        return rpcframe.ServerConfig(tls=TLSConfig.for_server(cert, key))
    if variant == "mtls":
        return rpcframe.ServerConfig(tls=TLSConfig.for_server(cert, key, client_ca=ca), auth=AuthConfig(mtls=True))
    if variant == "jwt":
        jwt_config = JWTConfig(ISSUER, AUDIENCE, keys=(JWTKey((material / "jwt-public.pem").read_bytes(), "RS256"),))
        policy = Policy((Rule(("rpcframe.bench.v1.BenchService",), principals=("jwt:bench",)),))
        return rpcframe.ServerConfig(auth=AuthConfig(jwt=jwt_config, policy=policy))
    return rpcframe.ServerConfig()


def channel_config(variant: str, material: Path) -> Any:
    """The ChannelConfig of one variant."""
    import rpcframe
    from rpcframe.security import TLSConfig

    ca = material / "ca.pem"
    if variant == "tls":
        return rpcframe.ChannelConfig(tls=TLSConfig.for_client(ca), default_timeout=10)
    if variant == "mtls":
        tls = TLSConfig.for_client(ca, cert=material / "client.pem", key=material / "client.key")
        return rpcframe.ChannelConfig(tls=tls, default_timeout=10)
    if variant == "jwt":
        return rpcframe.ChannelConfig(token=(material / "token").read_text(), default_timeout=10)
    return rpcframe.ChannelConfig(default_timeout=10)


# -- the two child roles ------------------------------------------------------------


async def serve(variant: str, material: Path) -> None:
    """Serve BenchService for one variant until SIGTERM; print ``serving on HOST:PORT``."""
    import rpcframe.aio
    from examples.bench_server import AioBenchServicer

    server = rpcframe.aio.Server(server_config(variant, material))
    server.add(AioBenchServicer())
    port = server.bind("127.0.0.1:0")
    await server.run(on_ready=lambda: print(f"serving on 127.0.0.1:{port}", flush=True))


async def load(variant: str, material: Path, target: str, warmup: float, seconds: float) -> dict[str, Any]:
    """Closed-loop unary load; prints ``measuring`` when the warm-up ends."""
    import rpcframe.aio
    from generated.rpcframe.bench.v1 import bench_pb2, bench_pb2_grpc

    request = bench_pb2.BenchRequest(payload=bytes(64), response_size=64)
    async with rpcframe.aio.connect(target, channel_config(variant, material)) as channel:
        stub = channel.stub(bench_pb2_grpc.BenchServiceStub)
        await stub.Unary(request)  # connect (and, for jwt, verify the token once) before timing
        counts = [0, 0]  # calls, errors in the measured phase
        phase = {"measuring": False, "stop": False}

        async def caller() -> None:
            while not phase["stop"]:
                try:
                    await stub.Unary(request)
                    ok = True
                except rpcframe.RpcError:
                    ok = False
                if phase["measuring"]:
                    counts[0 if ok else 1] += 1

        tasks = [asyncio.ensure_future(caller()) for _ in range(CONCURRENCY)]
        await asyncio.sleep(warmup)
        cpu0, t0 = os.times(), time.perf_counter()
        phase["measuring"] = True
        print("measuring", flush=True)
        await asyncio.sleep(seconds)
        phase["measuring"] = False
        elapsed = time.perf_counter() - t0
        cpu1 = os.times()
        phase["stop"] = True
        await asyncio.gather(*tasks)
    client_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"calls": counts[0], "errors": counts[1], "elapsed": elapsed, "client_cpu": client_cpu}


def _run_loop(main: Any) -> Any:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# -- orchestration ---------------------------------------------------------------


class ServerProcess:
    """One variant's server in its own process, known by PID."""

    def __init__(self, variant: str, material: Path, log: IO[str]) -> None:
        self.variant = variant
        argv = [sys.executable, "-m", "benchmarks.security", "--serve", variant, "--material", str(material)]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        self.pid = self.proc.pid
        self.target = ""

    def wait_ready(self) -> None:
        """Read the ``serving on`` line (bounded)."""
        line = _readline(self.proc.stdout, START_TIMEOUT)
        found = re.fullmatch(r"serving on (\S+:\d+)\n", line or "")
        if found is None:
            raise RuntimeError(f"{self.variant} server did not start: {line!r}")
        self.target = found.group(1)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process."""
        from rpcframe.bench.cpu import process_cpu_seconds

        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it does not drain in time."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _readline(stream: IO[str] | None, timeout: float) -> str | None:
    """One line from a child's stdout, or None after ``timeout`` s."""
    assert stream is not None
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else None


@contextmanager
def servers(material: Path, log: IO[str]) -> Iterator[dict[str, ServerProcess]]:
    """Every variant's server, started in parallel and stopped by PID at the end."""
    started: dict[str, ServerProcess] = {}
    try:
        for variant in VARIANTS:
            started[variant] = ServerProcess(variant, material, log)
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def measure(server: ServerProcess, material: Path, warmup: float, seconds: float) -> dict[str, float]:
    """One load-generator process against one server; server CPU over the measured phase."""
    argv = [sys.executable, "-m", "benchmarks.security", "--load", server.variant, "--material", str(material),
            "--target", server.target, "--warmup", str(warmup), "--seconds", str(seconds)]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        if _readline(proc.stdout, warmup + START_TIMEOUT) != "measuring\n":
            raise RuntimeError(f"{server.variant} load generator did not start")
        cpu0 = server.cpu_seconds()
        result_line = _readline(proc.stdout, seconds + RUN_TIMEOUT)
        cpu1 = server.cpu_seconds()
        proc.wait(RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
    if not result_line:
        raise RuntimeError(f"{server.variant} load generator gave no result")
    result = json.loads(result_line)
    calls = max(result["calls"], 1)
    return {
        "qps": result["calls"] / result["elapsed"],
        "errors": result["errors"],
        "server_cpu_us": (cpu1 - cpu0) / calls * 1e6,
        "client_cpu_us": result["client_cpu"] / calls * 1e6,
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(s: dict[str, float], digits: int = 0, suffix: str = "") -> str:
    return f"{s['median']:.{digits}f}{suffix} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def run(rounds: int, warmup: float, seconds: float, out: Path) -> dict[str, Any]:
    """All rounds; returns (and writes) the results."""
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="rpcframe-sec-") as tmp, tempfile.TemporaryFile("w+") as log:
        material = Path(tmp)
        make_material(material)
        with servers(material, log) as procs:
            for r in range(rounds):
                order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
                for variant in order:
                    runs[variant].append(measure(procs[variant], material, warmup, seconds))
                    last = runs[variant][-1]
                    print(f"round {r + 1}/{rounds} {variant:5s} {last['qps']:8.0f} QPS  "
                          f"server {last['server_cpu_us']:5.0f} µs/call", flush=True)  # fmt: skip
    return report(runs, rounds, seconds, out)


def report(runs: dict[str, list[dict[str, float]]], rounds: int, seconds: float, out: Path) -> dict[str, Any]:
    """Summaries and per-round ratios vs plain; writes security.json and security.md."""
    base = runs["plain"]
    variants: dict[str, Any] = {}
    for variant, rows in runs.items():
        variants[variant] = {
            "qps": _summary([row["qps"] for row in rows]),
            "server_cpu_us": _summary([row["server_cpu_us"] for row in rows]),
            "client_cpu_us": _summary([row["client_cpu_us"] for row in rows]),
            "errors": sum(int(row["errors"]) for row in rows),
            "qps_ratio": _summary([row["qps"] / b["qps"] for row, b in zip(rows, base, strict=True)]),
            "server_cpu_ratio": _summary(
                [row["server_cpu_us"] / b["server_cpu_us"] for row, b in zip(rows, base, strict=True)]
            ),
            "runs": rows,
        }
    result = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "setup": {"rounds": rounds, "seconds": seconds, "concurrency": CONCURRENCY, "message_bytes": 64},
        "variants": variants,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "security.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "security.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results table."""
    setup = result["setup"]
    lines = [
        "# Security overhead",
        "",
        f"rpcframe asyncio server and client (uvloop), separate processes, unary 64 B, {setup['concurrency']} "
        f"in flight; {setup['rounds']} rounds of {setup['seconds']} s, median [min–max]. Ratios are per round "
        "against `plain` (same round), then summarised. "
        f"{result['date']}, Python {result['machine']['python']}, {result['machine']['cpus']} CPUs.",
        "",
        "| variant | QPS | QPS ratio | server CPU µs/call | server CPU ratio | client CPU µs/call | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        lines.append(
            f"| {name} | {_fmt(v['qps'])} | {_fmt(v['qps_ratio'], 3)} | {_fmt(v['server_cpu_us'])} | "
            f"{_fmt(v['server_cpu_ratio'], 3)} | {_fmt(v['client_cpu_us'])} | {v['errors']} |"
        )
    lines += [
        "",
        "`tls`: server certificate verified by the client. `mtls`: plus client certificates, identity read per call. "
        "`jwt`: RS256 bearer token over loopback, verified once and then served from the per-token cache, plus a "
        "one-rule authorization policy.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one of its child roles)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.security", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 s (noisier)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--load", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--material", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _run_loop(serve(args.serve, args.material))
        return 0
    if args.load:
        result = _run_loop(load(args.load, args.material, args.target, args.warmup, args.seconds))
        print(json.dumps(result), flush=True)
        return 0
    rounds = args.rounds or (3 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    result = run(rounds, warmup, seconds, args.out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
