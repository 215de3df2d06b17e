"""PNG plots of a load run (matplotlib, Agg backend: no display needed).

- ``PREFIX-latency.png``: latency by percentile, x axis spread as
  1/(1-p) so the tail (99%, 99.9%, 99.99%) gets as much room as the median.
- ``PREFIX-timeline.png``: calls/s and p99 latency in 1 s buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .histogram import percentile_curve
from .runner import BenchResult

__all__ = ["plot_percentile_curves", "write_plots"]


def _pyplot() -> Any:
    # Imported lazily: matplotlib costs ~0.3 s to import and only plots need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(percentile: float) -> float:
    """x position of a percentile: 1/(1-p), capped where the data ends."""
    return 1.0 / max(1.0 - percentile / 100.0, 1e-6)


def plot_percentile_curves(curves: Sequence[tuple[str, Any]], path: str | Path, title: str) -> Path:
    """Plot latency-by-percentile curves of several histograms ((label, histogram)) into one PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for label, histogram in curves:
            points = [(p, v) for p, v in percentile_curve(histogram) if p < 100.0]
            if points:
                ax.plot([_spread(p) for p, _ in points], [v / 1000 for _, v in points], label=label)
        ax.set_xscale("log")
        ticks = [0.0, 50.0, 90.0, 99.0, 99.9, 99.99]
        ax.set_xticks([_spread(p) for p in ticks], [f"{p:g}%" for p in ticks])
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        if curves:
            ax.legend()
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def write_plots(result: BenchResult, prefix: str | Path) -> list[Path]:
    """Write the latency curve and the timeline of ``result``; returns the paths."""
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    title = f"{result.spec.method.path} ({result.spec.client}, {result.spec.mode})"
    paths = [plot_percentile_curves([(result.spec.client, result.merged.histogram)], f"{prefix}-latency.png", title)]
    plt = _pyplot()
    # A sliver of a last second (calls finishing after the phase) says
    # nothing about the rate; plot full-ish buckets as rates per second.
    timeline = [s for s in result.merged.timeline if s.width >= 0.5]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    try:
        seconds = [s.second for s in timeline]
        streaming = result.spec.method.kind != "unary_unary"
        top.plot(seconds, [(s.ok + s.failed) / s.width for s in timeline], marker=".", label="calls/s")
        if streaming:
            top.plot(seconds, [s.messages / s.width for s in timeline], marker=".", label="messages/s")
        if any(s.failed for s in timeline):
            top.plot(seconds, [s.failed / s.width for s in timeline], marker=".", label="errors/s")
        top.set_ylabel("per second")
        top.set_ylim(bottom=0)
        top.legend()
        top.grid(True, alpha=0.3)
        top.set_title(title)
        bottom.plot(seconds, [s.p99_us / 1000 for s in timeline], marker=".", color="tab:red", label="p99")
        bottom.plot(seconds, [s.p50_us / 1000 for s in timeline], marker=".", color="tab:gray", label="p50")
        bottom.set_ylabel("latency (ms)")
        bottom.set_xlabel("second of the measured phase")
        bottom.set_ylim(bottom=0)
        bottom.legend()
        bottom.grid(True, alpha=0.3)
        fig.tight_layout()
        out = Path(f"{prefix}-timeline.png")
        fig.savefig(out, dpi=100)
        paths.append(out)
    finally:
        plt.close(fig)
    return paths
