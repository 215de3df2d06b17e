"""``rpcframe bench``: a load generator for any gRPC service, and its parts.

::

    from rpcframe.bench import LoadSpec, build_request, resolve_method, run_bench

    method = resolve_method("rpcframe.bench.v1.BenchService/Unary", "127.0.0.1:50051")
    spec = LoadSpec("127.0.0.1:50051", method, build_request(method, '{"responseSize": 64}', 64),
                    mode="aio", client="rpcframe", concurrency=64, duration=10)
    result = run_bench(spec)

- :mod:`.methods`: message types from generated stubs or server reflection.
- :mod:`.schedule`: open-loop send times (no coordinated omission).
- :mod:`.engine`: closed/open load loops, sync threads or asyncio tasks,
  raw grpcio or rpcframe channels.
- :mod:`.runner`: one or several load-generator processes, merged.
- :mod:`.histogram`: HDR latency histograms, per caller and per second.
- :mod:`.report` (summary table, JSON schema) and :mod:`.plot` (PNGs).

It needs the ``bench`` extra (hdrhistogram, rich, matplotlib). Names are
imported on first use, so ``rpcframe``'s other commands start without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .histogram import Merged, Partial, Recorder
    from .methods import build_request, parse_method_name, resolve_method
    from .runner import BenchResult, run_bench
    from .schedule import OpenLoopSchedule
    from .spec import BenchError, LoadSpec, MethodInfo, parse_duration

_MODULE_OF = {
    "BenchError": "spec",
    "BenchResult": "runner",
    "LoadSpec": "spec",
    "Merged": "histogram",
    "MethodInfo": "spec",
    "OpenLoopSchedule": "schedule",
    "Partial": "histogram",
    "Recorder": "histogram",
    "build_request": "methods",
    "parse_duration": "spec",
    "parse_method_name": "methods",
    "resolve_method": "methods",
    "run_bench": "runner",
}

__all__ = [
    "BenchError",
    "BenchResult",
    "LoadSpec",
    "Merged",
    "MethodInfo",
    "OpenLoopSchedule",
    "Partial",
    "Recorder",
    "build_request",
    "parse_duration",
    "parse_method_name",
    "resolve_method",
    "run_bench",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
