"""``rpcframe publish`` and ``rpcframe consume``: a topic from the shell, JSON in and out (like ``call``).

Examples::

    rpcframe publish nats://127.0.0.1:4222 acme.orders.created --type acme.orders.v1.OrderCreated \\
        -d '{"order_id": "o-1"}' --msg-id o-1
    rpcframe consume nats://127.0.0.1:4222 acme.orders.created --type acme.orders.v1.OrderCreated --count 10
    rpcframe consume nats://127.0.0.1:4222 acme.orders.created --type acme.orders.v1.OrderCreated --dead-letters

Needs the ``events`` extra (nats-py). Message types come from generated
modules: ``--proto-module``, else the ``*_pb2`` modules of the type's package
under ``generated/`` or the import path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from ._call import _import_modules, _parse, _seconds
from ._common import CliError

__all__ = ["register"]

_EPILOG = """\
exit codes:
  0  published (its stream acknowledgement printed as JSON), or consumed until --count or --idle
  1  the broker cannot be reached or did not acknowledge, unknown --type, --proto-module that fails to import
  2  usage: bad arguments or event JSON
"""


def register(sub: Any) -> None:
    """Add the two subcommands to the parser."""
    pub: argparse.ArgumentParser = sub.add_parser(
        "publish", help="publish one event (JSON) on a topic of a NATS JetStream broker",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _common(pub)
    pub.add_argument("-d", "--data", default="{}", metavar="JSON|-", help="the event as protobuf JSON (- for stdin)")
    pub.add_argument("--msg-id", default=None, help="message id: publishing it again stores it once")
    pub.add_argument("--key", default=None, help="ordering key (topics with partitions)")
    pub.add_argument("--partitions", type=int, default=0, help="the topic's partitions (ordered by --key)")
    pub.add_argument("--ttl", type=_seconds, default=None, help="seconds the event stays worth handling")
    pub.set_defaults(run=run_publish)
    con: argparse.ArgumentParser = sub.add_parser(
        "consume", help="print a topic's events (or dead letters) as JSON lines, as a member of a consumer group",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _common(con)
    con.add_argument("--group", default="rpcframe-cli", help="consumer group (default rpcframe-cli; durable)")
    con.add_argument("--count", type=int, default=None, help="stop after this many events")
    con.add_argument("--idle", type=_seconds, default=None, help="stop after this many seconds without an event")
    con.add_argument("--dead-letters", action="store_true", help="read the topic's dead letters (reason included)")
    con.add_argument("--headers", action="store_true", help='print {"headers": ..., "event": ...} per line')
    con.set_defaults(run=run_consume)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("server", metavar="NATS_URL", help="nats://HOST:PORT (comma-separated for a cluster)")
    p.add_argument("topic", metavar="TOPIC", help="the topic (subject), e.g. acme.orders.created")
    p.add_argument("--type", required=True, metavar="PKG.MESSAGE", help="the protobuf type the topic carries")
    p.add_argument("--proto-module", action="append", default=[], metavar="MODULE",
                   help="generated *_pb2 module defining --type (repeatable)")  # fmt: skip


def _message_class(args: argparse.Namespace) -> type[Message]:
    from ..bench.methods import _import_stubs

    _import_modules(args.proto_module)
    pool = descriptor_pool.Default()
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(args.type))
    except KeyError:
        _import_stubs(args.type)  # the *_pb2 modules of the type's package, under generated/ or the path
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(args.type))
    except KeyError:
        raise CliError(f"unknown --type {args.type}: pass --proto-module with its generated *_pb2 module") from None


def _topic(args: argparse.Namespace) -> Any:
    from ..errors import ConfigError
    from ..events import Topic

    try:
        return Topic(args.topic, _message_class(args), partitions=getattr(args, "partitions", 0))
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None


async def _connect(server: str) -> Any:
    try:
        from ..events import BrokerUnavailable, Events
    except ImportError as exc:  # pragma: no cover - the dev extra installs nats-py
        raise CliError(f"needs the events extra (pip install 'rpcframe[events]'): {exc}") from None
    try:
        return await Events.connect(
            server.split(",") if "," in server else server, publisher="rpcframe-cli", within=2.0
        )
    except BrokerUnavailable as exc:
        raise CliError(str(exc)) from None


def run_publish(args: argparse.Namespace) -> int:
    """Publish one event; print the acknowledgement."""
    topic = _topic(args)
    text = sys.stdin.read() if args.data == "-" else args.data
    event = _parse(topic.message, text, "-d")
    return asyncio.run(_publish(args, topic, event))


async def _publish(args: argparse.Namespace, topic: Any, event: Message) -> int:
    from ..errors import ConfigError
    from ..events import PublishError

    events = await _connect(args.server)
    try:
        ack = await events.publish(topic, event, msg_id=args.msg_id, key=args.key, ttl=args.ttl, within=10.0)
    except PublishError as exc:
        raise CliError(str(exc)) from None
    except ConfigError as exc:  # a key for an unordered topic, or none for an ordered one
        raise CliError(str(exc), 2) from None
    finally:
        await events.close()
    print(json.dumps({"stream": topic.stream.name, "sequence": ack.sequence, "duplicate": ack.duplicate,
                      "msg_id": ack.msg_id}))  # fmt: skip
    return 0


def run_consume(args: argparse.Namespace) -> int:
    """Print events as JSON lines until --count or --idle."""
    if args.count is not None and args.count < 1:
        raise CliError("--count must be >= 1", 2)
    return asyncio.run(_consume(args, _topic(args)))


async def _consume(args: argparse.Namespace, topic: Any) -> int:
    from ..events import Pump

    events = await _connect(args.server)
    stream, subject = (
        (topic.dead_letters, topic.dead_letter_subject) if args.dead_letters else (topic.stream, topic.name)
    )
    printed, done, last = 0, asyncio.Event(), asyncio.get_running_loop().time()

    class Printer(Pump):
        async def process(self, msg: Any) -> None:
            nonlocal printed, last
            if done.is_set():
                await msg.nak(0)  # past --count: leave it for the next reader
                return
            try:
                body = json_format.MessageToDict(topic.message.FromString(msg.data), preserving_proto_field_name=True)
            except Exception as exc:  # noqa: BLE001 - a bad payload is shown, not fatal
                body = {"unparseable": f"{exc}", "bytes": len(msg.data)}
            line = {"headers": dict(msg.headers), "event": body} if args.headers else body
            print(json.dumps(line, ensure_ascii=False), flush=True)
            await msg.ack()
            printed += 1
            last = asyncio.get_running_loop().time()
            if args.count is not None and printed >= args.count:
                done.set()

    dead = topic.dead_letters
    pump = Printer(events, stream, subject, args.group, dead, topic.dead_letter_subject, concurrency=1)
    try:
        await pump.start()
        while not done.is_set():
            if args.idle is not None and asyncio.get_running_loop().time() - last > args.idle:
                break
            try:
                await asyncio.wait_for(done.wait(), 0.1)
            except TimeoutError:
                continue
    finally:
        await pump.stop()
        await events.close()
    return 0
