"""The dashboard chart: queue depth per queue (bars) and throughput over time (lines).

:func:`chart_data` computes what to draw from Inspector frames (no drawing
library needed); :func:`chart_png` draws it with matplotlib, imported only
when a chart is drawn, without pyplot (no global state: safe from a timer thread).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import pandas as pd

THROUGHPUT_METRICS = ("jobs_completed", "jobs_failed")
"""Counters drawn as throughput lines."""
CHART_BINS = 60
"""How many of the latest throughput bins the chart draws."""
_LINE_LABELS = {"jobs_completed": "completed", "jobs_failed": "failed attempts"}

@dataclass(frozen=True)
class ChartData:
    """What the chart draws.

    Attributes
    ----------
    queue_depth
        Waiting jobs per queue (index: queue name, sorted), in-flight jobs excluded.
    throughput
        The latest :data:`CHART_BINS` bins of ``jobs_completed`` and
        ``jobs_failed`` per bin (a UTC time index).
    """

    queue_depth: pd.Series
    throughput: pd.DataFrame


def chart_data(queue: pd.DataFrame, throughput: pd.DataFrame, *,
               bins: int = CHART_BINS) -> ChartData:
    """Compute the chart's data from ``Inspector.queue()`` and a throughput series.

    Parameters
    ----------
    queue
        A frame with the schema of ``Inspector.queue()``.
    throughput
        ``Inspector.metric_series(THROUGHPUT_METRICS)``.
    bins
        Keep the latest this many time bins.

    Returns
    -------
    ChartData
    """
    waiting = queue[~queue["in_flight"].fillna(False).astype(bool)]
    depth = waiting.groupby(waiting["queue"].astype(str)).size().sort_index().astype("int64")
    depth.index.name = "queue"
    lines = throughput.reindex(columns=list(THROUGHPUT_METRICS)).fillna(0).astype("int64")
    return ChartData(depth.rename("depth"), lines.tail(bins))


def chart_png(data: ChartData, *, width: float = 9.0, height: float = 2.6, dpi: int = 80) -> bytes:
    """Draw queue depth (bars) and throughput (lines) side by side; return a PNG.

    matplotlib is imported here, and the figure is drawn without pyplot (no
    global state, safe from a timer thread).

    Parameters
    ----------
    data
        From :func:`chart_data`.
    width, height
        Figure size in inches.
    dpi
        Resolution.

    Returns
    -------
    bytes
        The PNG image.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    bars, lines = fig.subplots(1, 2, width_ratios=(1, 2))
    _draw_depth(bars, data.queue_depth)
    _draw_throughput(lines, data.throughput)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _draw_depth(ax: Any, depth: pd.Series) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title("queue depth", fontsize=10)
    if depth.empty:
        ax.text(0.5, 0.5, "no queued jobs", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    else:
        ax.bar([str(q) for q in depth.index], depth.to_numpy(), color="#9467bd")
    ax.set_ylabel("jobs")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_throughput(ax: Any, throughput: pd.DataFrame) -> None:
    ax.set_title("throughput (jobs per bin)", fontsize=10)
    if throughput.empty:
        ax.text(0.5, 0.5, "no finished jobs yet", ha="center", va="center", transform=ax.transAxes)
        return
    from matplotlib.dates import DateFormatter
    from matplotlib.ticker import MaxNLocator

    times = pd.DatetimeIndex(throughput.index).tz_convert(None)
    for name, colour in zip(THROUGHPUT_METRICS, ("#2ca02c", "#d62728"), strict=True):
        ax.plot(times, throughput[name].to_numpy(), marker="o", label=_LINE_LABELS[name],
                color=colour)
    step = times[1] - times[0] if len(times) > 1 else pd.Timedelta(minutes=1)
    ax.set_xlim(times[0] - step / 2, times[-1] + step / 2)
    ax.set_ylim(bottom=0)
    ax.set_xticks(times[::max(1, -(-len(times) // 6))])  # whole bins only: no repeated labels
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M"))  # type: ignore[no-untyped-call]
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("UTC", fontsize=8)
    ax.legend(fontsize=8, loc="upper left")
    ax.tick_params(axis="x", labelsize=8)
