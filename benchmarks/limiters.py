"""Why rpcframe's limiter is a gradient and not Vegas: both on the same simulated server.

``python -m benchmarks.limiters`` runs the processor-sharing simulation of
``tests/unit/test_overload_core.py`` (a one-core CPU-bound server: 2 ms of
work per call, Poisson arrivals) warmed at 0.5x capacity, then at 5x for
5 s, with rpcframe's :class:`~rpcframe._core.overload.GradientLimiter` and
with a Vegas limiter as Netflix's concurrency-limits describes it (queue =
limit * (1 - min_rtt / rtt); grow by log10(limit) below 3*log10(limit),
shrink by log10(limit) above 6*log10(limit)), both starting from the same
high limit. Prints goodput (OK calls/s), p99 latency and the limit, per second.
"""

from __future__ import annotations

import math

from rpcframe._core.overload import Admission, GradientLimiter, OverloadConfig, criticality_share
from tests.unit.test_overload_core import _p99, _simulate


class VegasLimiter(GradientLimiter):
    """Vegas' additive steps in place of the gradient (same sampling and no-load latency)."""

    def _update(self, sample_rtt: float, peak: int) -> None:
        limit = self.limit
        if sample_rtt <= 0 or self.min_rtt <= 0:
            return
        queue = limit * (1 - self.min_rtt / sample_rtt)
        step = max(1.0, math.log10(limit))
        if queue <= 3 * step and peak >= limit / 2:
            limit += step
        elif queue >= 6 * step:
            limit -= step
        self.limit = min(1000.0, max(1.0, limit))


def run(limiter: type[GradientLimiter]) -> tuple[float, list[tuple[int, float, float]]]:
    """(unloaded p99 ms, [(OK calls, p99 ms, limit) per second at 5x])."""
    admission = Admission(OverloadConfig(), 0.0, share=criticality_share)
    admission.limiter = limiter(OverloadConfig(), 0.0)
    unloaded = _simulate(admission, rate=250, seconds=1, work=0.002)
    seconds = []
    for second in range(5):
        out = _simulate(admission, rate=2500, seconds=1, work=0.002, start=1.0 + second)
        seconds.append((len(out["ok"]), round(_p99(out["ok"]) * 1000, 1), round(admission.limiter.limit, 1)))
    return round(_p99(unloaded["ok"]) * 1000, 1), seconds


def main() -> None:
    """Print both limiters' seconds at 5x."""
    for name, limiter in (("gradient", GradientLimiter), ("vegas", VegasLimiter)):
        unloaded, seconds = run(limiter)
        print(f"{name:9} unloaded p99 {unloaded} ms; at 5x, per second (OK calls, p99 ms, limit): {seconds}")


if __name__ == "__main__":
    main()
