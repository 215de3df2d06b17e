"""Events on NATS JetStream: rpcframe.events next to raw nats-py doing the same, on one nats-server.

Run: ``python -m benchmarks.events [--quick]``; writes ``benchmarks/results/events.md``.

- Publish: N events of 1 KiB, each acknowledged by the stream and carrying a
  message id, ``WINDOW`` in flight; rpcframe's ``Events.publish`` (typed,
  headers, retry loop) vs nats-py's ``js.publish`` with a ``Nats-Msg-Id``.
- Consume: N stored events, each parsed as the protobuf type and acked;
  rpcframe's ``Consumer`` (concurrency 64, async no-op handler) vs a nats-py
  pull loop (fetch 64, parse, ack).
- End to end: events published at a fixed rate, latency from before publish
  to the handler's first line, p50/p99; both paths.

Each throughput is the best of ``ROUNDS`` interleaved rounds (the machine is
shared), on fresh streams. Needs nats-server (``make system``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.js import api

from benchmarks._children import REPO
from generated.rpcframe.echo.v1 import echo_pb2 as pb
from rpcframe.events import EventContext, Events, Topic
from tests.events.natsserver import NatsServer, nats_server_binary

WINDOW = 64
ROUNDS = 3
PAYLOAD = pb.EchoRequest(message="x" * 1021)  # 1024 bytes serialized
_names = iter(range(1_000_000))


def _topic() -> Topic[pb.EchoRequest]:
    return Topic(f"bench.t{next(_names)}", pb.EchoRequest)


async def _windowed(n: int, one: Callable[[int], Awaitable[Any]]) -> float:
    """Seconds to run ``one(i)`` for i < n with WINDOW in flight."""
    start = time.perf_counter()
    for base in range(0, n, WINDOW):
        await asyncio.gather(*(one(i) for i in range(base, min(base + WINDOW, n))))
    return time.perf_counter() - start


async def publish_rpcframe(events: Events, n: int) -> float:
    topic = _topic()
    await events.ensure(topic.stream)
    return n / await _windowed(n, lambda i: events.publish(topic, PAYLOAD, msg_id=f"m{i}"))


async def publish_raw(nc: Any, n: int) -> float:
    js = nc.jetstream()
    subject = f"bench.raw{next(_names)}"
    await js.add_stream(api.StreamConfig(name=subject.replace(".", "_"), subjects=[subject], duplicate_window=120))
    data = PAYLOAD.SerializeToString()
    return n / await _windowed(n, lambda i: js.publish(subject, data, headers={"Nats-Msg-Id": f"m{i}"}))


async def consume_rpcframe(events: Events, n: int) -> float:
    topic = _topic()
    await events.ensure(topic.stream)
    await _windowed(n, lambda i: events.publish(topic, PAYLOAD, msg_id=f"m{i}"))
    done = asyncio.Event()
    count = 0

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    start = time.perf_counter()
    async with events.consumer(topic, "bench", handle, concurrency=64):
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - start
    return n / elapsed


async def consume_raw(nc: Any, n: int) -> float:
    js = nc.jetstream()
    subject = f"bench.raw{next(_names)}"
    await js.add_stream(api.StreamConfig(name=subject.replace(".", "_"), subjects=[subject], duplicate_window=120))
    data = PAYLOAD.SerializeToString()
    await _windowed(n, lambda i: js.publish(subject, data, headers={"Nats-Msg-Id": f"m{i}"}))
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, max_deliver=6, ack_wait=30, max_ack_pending=-1)
    start = time.perf_counter()
    sub = await js.pull_subscribe(subject, durable="bench", config=config)
    count = 0
    end = start + 120
    while count < n and time.perf_counter() < end:
        try:
            msgs = await sub.fetch(64, timeout=0.5)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            pb.EchoRequest.FromString(msg.data)
            await msg.ack()
            count += 1
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    return n / elapsed


async def _until(done: Callable[[], bool], seconds: float) -> None:
    """Wait (bounded) until the handlers have seen every event."""
    end = time.perf_counter() + seconds
    while not done() and time.perf_counter() < end:  # noqa: ASYNC110 - counts kept by handlers, polled
        await asyncio.sleep(0.01)


async def _faststream_case(url: str, n: int, consume: bool) -> float:
    """faststream (the Python peer users would pick) doing the same on the same server: events/s."""
    from faststream.nats import JStream, NatsBroker, PullSub

    subject = f"bench.fs{next(_names)}"
    name = subject.replace(".", "_")
    raw = await nats.connect(url)
    await raw.jetstream().add_stream(api.StreamConfig(name=name, subjects=[subject], duplicate_window=120))
    await raw.close()
    broker = NatsBroker(url, logger=None)
    done, count = asyncio.Event(), 0

    @broker.subscriber(subject, stream=JStream(name, declare=False), durable="bench", pull_sub=PullSub(64, 0.5))
    async def handle(body: bytes) -> None:  # acked after it returns (faststream's default)
        nonlocal count
        pb.EchoRequest.FromString(body)
        count += 1
        if count == n:
            done.set()

    await broker.connect()
    data = PAYLOAD.SerializeToString()
    elapsed = await _windowed(n, lambda i: broker.publish(data, subject, headers={"Nats-Msg-Id": f"m{i}"}, stream=name))
    if consume:
        start = time.perf_counter()
        await broker.start()
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - start
    await broker.stop()
    return n / elapsed


def _has_faststream() -> bool:
    try:
        import faststream.nats  # noqa: F401
    except ImportError:
        return False
    return True


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _paced(rate: int, seconds: float, send: Callable[[int], Awaitable[Any]]) -> int:
    """Call send(i) at ``rate`` per second for ``seconds`` (a send that is late is not made up for)."""
    n = int(rate * seconds)
    start = time.perf_counter()
    pending = set()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)
    return n


async def latency_rpcframe(events: Events, rate: int, seconds: float) -> tuple[float, float]:
    topic = _topic()
    await events.ensure(topic.stream)
    latencies: list[float] = []
    n = int(rate * seconds)

    async def handle(event: pb.EchoRequest, ctx: EventContext) -> None:
        latencies.append(time.perf_counter() - float(event.message[:24]))

    async with events.consumer(topic, "lat", handle, concurrency=64, fetch_wait=0.2):

        async def send(i: int) -> None:
            stamp = f"{time.perf_counter():<24.9f}"
            await events.publish(topic, pb.EchoRequest(message=stamp + PAYLOAD.message[24:]), msg_id=f"m{i}")

        await _paced(rate, seconds, send)
        await _until(lambda: len(latencies) >= n, 30)
    return _percentile(latencies, 0.5) * 1000, _percentile(latencies, 0.99) * 1000


async def latency_raw(nc: Any, rate: int, seconds: float) -> tuple[float, float]:
    js = nc.jetstream()
    subject = f"bench.raw{next(_names)}"
    await js.add_stream(api.StreamConfig(name=subject.replace(".", "_"), subjects=[subject], duplicate_window=120))
    config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, max_deliver=6, ack_wait=30, max_ack_pending=-1)
    sub = await js.pull_subscribe(subject, durable="lat", config=config)
    latencies: list[float] = []
    n = int(rate * seconds)
    stop = asyncio.Event()

    async def pull() -> None:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(64, timeout=0.2)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                event = pb.EchoRequest.FromString(msg.data)
                latencies.append(time.perf_counter() - float(event.message[:24]))
                await msg.ack()

    puller = asyncio.create_task(pull())

    async def send(i: int) -> None:
        stamp = f"{time.perf_counter():<24.9f}"
        data = pb.EchoRequest(message=stamp + PAYLOAD.message[24:]).SerializeToString()
        await js.publish(subject, data, headers={"Nats-Msg-Id": f"m{i}"})

    await _paced(rate, seconds, send)
    await _until(lambda: len(latencies) >= n, 30)
    stop.set()
    await puller
    await sub.unsubscribe()
    return _percentile(latencies, 0.5) * 1000, _percentile(latencies, 0.99) * 1000


async def run(url: str, quick: bool) -> str:  # noqa: C901 - a flat list of cases
    n = 2000 if quick else 10000
    rate, seconds = (200, 3.0) if quick else (500, 10.0)
    events = await Events.connect(url, publisher="bench")
    nc = await nats.connect(url)
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for _ in range(ROUNDS):
        cases = [
            ("publish raw", lambda: publish_raw(nc, n)),
            ("publish rpcframe", lambda: publish_rpcframe(events, n)),
            ("consume raw", lambda: consume_raw(nc, n)),
            ("consume rpcframe", lambda: consume_rpcframe(events, n)),
        ]
        if _has_faststream():
            cases += [
                ("publish faststream", lambda: _faststream_case(url, n, False)),
                ("consume faststream", lambda: _faststream_case(url, n, True)),
            ]
        for name, fn in cases:
            used = time.process_time()
            rate_seen = await fn()
            # Consume cases also publish their events first: that part's CPU is in both columns alike.
            per_event = (time.process_time() - used) / n * 1e6
            best[name] = max(best.get(name, 0.0), rate_seen)
            cpu[name] = min(cpu.get(name, float("inf")), per_event)
            print(f"{name}: {rate_seen:,.0f}/s, {per_event:.0f} us CPU per event", file=sys.stderr)
    lat_raw = await latency_raw(nc, rate, seconds)
    lat_rf = await latency_rpcframe(events, rate, seconds)
    await nc.close()
    await events.close()
    return report(n, rate, seconds, best, cpu, lat_raw, lat_rf, quick)


def report(
    n: int, rate: int, seconds: float, best: dict[str, float], cpu: dict[str, float],
    lat_raw: tuple[float, float], lat_rf: tuple[float, float], quick: bool,
) -> str:  # fmt: skip
    lines = [
        "# Events on NATS JetStream: rpcframe.events vs raw nats-py",
        "",
        f"`python -m benchmarks.events{' --quick' if quick else ''}`: {n} events of 1 KiB per throughput run "
        f"(best of {ROUNDS} interleaved rounds; CPU: the least), {WINDOW} publishes in flight, "
        "one nats-server -js on loopback, "
        "2 shared cores. The ratio is rpcframe/raw for throughput and raw/rpcframe for CPU (higher is better "
        "for rpcframe either way); the consume rows' CPU includes publishing the events they read.",
        "",
        "| what | raw nats-py | rpcframe | ratio | faststream | rpcframe/faststream |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for what in ("publish", "consume"):
        raw, rf, fs = best[f"{what} raw"], best[f"{what} rpcframe"], best.get(f"{what} faststream")
        peer = f"{fs:,.0f} | {rf / fs:.2f}x" if fs else "not installed | "
        lines.append(f"| {what} (acked), events/s | {raw:,.0f} | {rf:,.0f} | {rf / raw:.2f}x | {peer} |")
    for what in ("publish", "consume"):
        raw, rf, fs = cpu[f"{what} raw"], cpu[f"{what} rpcframe"], cpu.get(f"{what} faststream")
        peer = f"{fs:.0f} | {fs / rf:.2f}x" if fs else "not installed | "
        lines.append(f"| {what}: client CPU per event, us | {raw:.0f} | {rf:.0f} | {raw / rf:.2f}x | {peer} |")
    lines += [
        f"| end to end at {rate}/s for {seconds:.0f} s, p50 ms | {lat_raw[0]:.2f} | {lat_rf[0]:.2f} | | | |",
        f"| end to end at {rate}/s for {seconds:.0f} s, p99 ms | {lat_raw[1]:.2f} | {lat_rf[1]:.2f} | | | |",
        "",
        "Publish: rpcframe adds the type check, the headers (type, publisher, trace, deadline, criticality) and "
        "its retry loop. Consume: rpcframe runs each event on one of its `concurrency` workers, with the "
        "deadline/trace context and the in-progress keep-alive; the raw loop parses and acks inline. faststream: "
        "`broker.publish(..., stream=)` with a Nats-Msg-Id header, and a durable pull subscriber (batch 64) that "
        "parses the protobuf and acks after the handler (its default); the consume CPU column includes its "
        "publishing, as the others do.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """Start a nats-server, run the cases, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events (about 30 s)")
    args = parser.parse_args()
    binary = nats_server_binary()
    if binary is None:
        raise SystemExit("nats-server is not installed (make system installs it as root)")
    server = NatsServer(binary)
    server.start()
    try:
        text = asyncio.run(run(server.url, args.quick))
    finally:
        server.close()
    out = REPO / "benchmarks" / "results" / "events.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
