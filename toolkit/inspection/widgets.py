"""The logic of the SRE dashboard (``toolkit.widgets``), free of any widget library.

Everything the dashboard shows is computed here from Inspector frames, as
plain functions and frozen dataclasses that a test can call without a browser
or a kernel:

- :class:`Filters` and :func:`filter_jobs`: what the three dropdowns select;
- :func:`workflow_options`, :func:`status_options`, :func:`worker_options`:
  the dropdowns' (label, value) pairs, ``None`` meaning "all";
- :func:`take_snapshot`: every frame of one refresh, read from an Inspector;
- :func:`summary_html`: the summary as a compact HTML status board;
- :func:`jobs_table` and :meth:`JobsTable.to_html`: the rows the table shows
  (at most ``limit``, with a note of how many were hidden);
- the chart's data and drawing live in :mod:`toolkit.inspection.chart`.

Importing this module imports neither ipywidgets nor matplotlib.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from toolkit import errors, models, validate
from toolkit.inspection.chart import THROUGHPUT_METRICS

if TYPE_CHECKING:
    from toolkit.inspection.inspector import Inspector

ALL_LABEL = "(all)"
"""Label of the dropdown entry that selects everything (its value is ``None``)."""
DEFAULT_LIMIT = 50
"""Rows the jobs table shows at most."""
DEFAULT_FREQ = "1min"
"""Bin width of the throughput lines (the metric buckets are one minute wide)."""

STATUS_RANK = {s: i for i, s in enumerate(("running", "assigned", "queued", "failed", "pending",
                                           "cancelled", "completed"))}
"""Order of the jobs table: live work first, finished work last."""

_STATUS_COLOURS = {"running": "#1f77b4", "assigned": "#17becf", "queued": "#9467bd",
                   "failed": "#d62728", "pending": "#7f7f7f", "cancelled": "#8c564b",
                   "completed": "#2ca02c"}
_TABLE_COLUMNS = ("job", "name", "workflow", "status", "queue", "priority", "attempts", "worker",
                  "wait_s", "duration_s", "updated", "error")

Option = tuple[str, str | None]
"""A dropdown entry: (label, value); value ``None`` selects everything."""


# -- filters ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Filters:
    """What the dashboard's dropdowns select; ``None`` selects everything.

    Parameters
    ----------
    workflow_id
        Only jobs of this workflow.
    status
        Only jobs in this status (a :class:`toolkit.JobStatus` value).
    worker_id
        Only jobs held (or last held) by this worker.

    Raises
    ------
    ValidationError
        ``status`` is not a job status, or an id is not a usable id.
    """

    workflow_id: str | None = None
    status: str | None = None
    worker_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("workflow_id", "worker_id"):
            value = getattr(self, name)
            if value is not None:
                validate.identifier(name, value)
        if self.status is not None:
            object.__setattr__(self, "status",
                               validate.status("status", self.status, models.JobStatus).value)

    def describe(self, workflow_names: Mapping[str, str] | None = None) -> str:
        """Return the active filters as text, e.g. ``"status = failed"`` (``"all jobs"`` if none).

        Parameters
        ----------
        workflow_names
            ``{workflow_id: name}``: show the workflow's name rather than its id.
        """
        names = workflow_names or {}
        workflow = names.get(self.workflow_id, self.workflow_id) if self.workflow_id else None
        parts = [f"{name} = {value}" for name, value in
                 (("workflow", workflow), ("status", self.status), ("worker", self.worker_id))
                 if value is not None]
        return ", ".join(parts) if parts else "all jobs"


def filter_jobs(jobs: pd.DataFrame, filters: Filters) -> pd.DataFrame:
    """Return the rows of an Inspector ``jobs()`` frame that ``filters`` select.

    Parameters
    ----------
    jobs
        A frame with the schema of ``Inspector.jobs()``.
    filters
        The selection.

    Returns
    -------
    pandas.DataFrame
        The selected rows, same columns and dtypes.
    """
    keep = pd.Series(True, index=jobs.index)
    for column, value in (("workflow_id", filters.workflow_id), ("status", filters.status),
                          ("worker_id", filters.worker_id)):
        if value is not None:
            keep &= (jobs[column].astype("string") == value).fillna(False).astype(bool)
    return jobs[keep]


def workflow_options(workflows: pd.DataFrame) -> list[Option]:
    """Return the workflow dropdown entries: ``(all)`` then one per workflow, by name.

    A name shared by several workflows is told apart by the start of its id.

    Parameters
    ----------
    workflows
        A frame with the schema of ``Inspector.workflows()``.

    Returns
    -------
    list of (label, value)
    """
    names = workflows["name"].astype(str)
    shared = set(names[names.duplicated(keep=False)])
    entries = sorted((f"{n} ({wid[:8]})" if n in shared else n, str(wid))
                     for wid, n in zip(workflows.index, names, strict=True))
    return [(ALL_LABEL, None), *entries]


def status_options() -> list[Option]:
    """Return the job status dropdown entries: ``(all)`` then every job status."""
    return [(ALL_LABEL, None), *[(s.value, s.value) for s in models.JobStatus]]


def worker_options(workers: pd.DataFrame) -> list[Option]:
    """Return the worker dropdown entries: ``(all)`` then one per worker, dead ones marked.

    Parameters
    ----------
    workers
        A frame with the schema of ``Inspector.workers()``.

    Returns
    -------
    list of (label, value)
    """
    alive = workers["alive"].fillna(False).astype(bool)
    entries = [(wid if ok else f"{wid} (dead)", str(wid))
               for wid, ok in zip(workers.index, alive, strict=True)]
    return [(ALL_LABEL, None), *sorted(entries)]


# -- one refresh -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """Every frame of one dashboard refresh.

    Attributes
    ----------
    filters
        The filters the jobs frame was selected with.
    summary, workflows, jobs, workers, queue, throughput, actions
        Inspector frames; ``jobs`` is already filtered, ``throughput`` is
        ``metric_series(THROUGHPUT_METRICS)``, ``actions`` the bulk operator actions.
    """

    filters: Filters
    summary: pd.DataFrame
    workflows: pd.DataFrame
    jobs: pd.DataFrame
    workers: pd.DataFrame
    queue: pd.DataFrame
    throughput: pd.DataFrame = field(repr=False)
    actions: pd.DataFrame = field(repr=False, default_factory=lambda: _empty_actions())

    def frames(self) -> dict[str, pd.DataFrame]:
        """Return the frames by name (what the dashboard shows, without widgets)."""
        return {"summary": self.summary, "workflows": self.workflows, "jobs": self.jobs,
                "workers": self.workers, "queue": self.queue, "throughput": self.throughput,
                "actions": self.actions}


def _empty_actions() -> pd.DataFrame:
    from toolkit.inspection import frames

    return frames.empty("actions")


def take_snapshot(inspector: Inspector, filters: Filters | None = None, *,
                  freq: str = DEFAULT_FREQ) -> Snapshot:
    """Read every frame the dashboard shows from ``inspector`` (read-only).

    The workflow and status filters go to PostgreSQL; the worker filter is
    applied to the result.

    Parameters
    ----------
    inspector
        Where to read.
    filters
        The jobs selection (everything when ``None``).
    freq
        Bin width of the throughput series.

    Returns
    -------
    Snapshot

    Raises
    ------
    StorageUnavailable
        A server did not answer.
    """
    filters = filters or Filters()
    jobs = inspector.jobs(workflow_id=filters.workflow_id, status=filters.status)
    return Snapshot(
        filters=filters, summary=inspector.summary(), workflows=inspector.workflows(),
        jobs=filter_jobs(jobs, filters), workers=inspector.workers(), queue=inspector.queue(),
        throughput=inspector.metric_series(list(THROUGHPUT_METRICS), freq=freq),
        actions=inspector.actions(),
    )


# -- summary board ---------------------------------------------------------------------------

_BOARD: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("workflows", (("total", "workflows"), ("running", "workflows_running"),
                   ("completed", "workflows_completed"), ("failed", "workflows_failed"))),
    ("jobs", (("queued", "jobs_queued"), ("scheduled", "jobs_scheduled"), ("running", "jobs_running"),
              ("completed", "jobs_completed"), ("failed", "jobs_failed"),
              ("orphan-capped", "jobs_orphan_capped"))),
    ("workers", (("alive", "workers_alive"), ("total", "workers"))),
    ("queue", (("depth", "queue_depth"), ("in flight", "in_flight"), ("paused", "queues_paused"),
               ("oldest s", "oldest_queued_age_s"))),
)


STUCK_AFTER = 900
"""Seconds the oldest queued job may wait before the board draws the backlog in red."""


def board_alerts(values: Mapping[str, int]) -> set[str]:
    """Return the summary items an SRE should look at: failures, dead workers, a stuck backlog
    (jobs but no live worker, or a job queued for more than :data:`STUCK_AFTER` seconds),
    a paused queue.

    Parameters
    ----------
    values
        ``{item: value}`` of ``Inspector.summary()``.

    Returns
    -------
    set of str
        The items to draw in red.
    """
    alerts = {k for k in ("workflows_failed", "jobs_failed", "jobs_orphan_capped")
              if values.get(k, 0) > 0}
    if values.get("workers_alive", 0) < values.get("workers", 0):
        alerts.add("workers_alive")
    if values.get("queue_depth", 0) > 0 and values.get("workers_alive", 0) == 0:
        alerts.add("queue_depth")
    if values.get("queues_paused", 0) > 0:  # an operator's pause: a reason to look, not a fault
        alerts.add("queues_paused")
    if values.get("oldest_queued_age_s", 0) > STUCK_AFTER:
        alerts.add("oldest_queued_age_s")
    return alerts


def last_action_text(actions: pd.DataFrame) -> str:
    """One line on the latest bulk action, e.g. ``"last action: requeue by sre-1 at 10:00 UTC:
    228 applied, 2 skipped (finished): dep back"``; empty when there is none.
    """
    if actions.empty:
        return ""
    row = actions.iloc[-1]
    at = row["created_at"]
    when = "" if pd.isna(at) else f" at {at:%Y-%m-%d %H:%M} UTC"
    why = "" if pd.isna(row["reason"]) else f": {row['reason']}"
    return (f"last action: {row['verb']} by {row['actor']}{when}: {row['applied']} applied, "
            f"{row['skipped']} skipped ({row['status']}){why}")


def summary_html(summary: pd.DataFrame, *, source: str = "",
                 actions: pd.DataFrame | None = None) -> str:
    """Render ``Inspector.summary()`` as a compact HTML status board.

    Parameters
    ----------
    summary
        A frame with the schema of ``Inspector.summary()``.
    source
        Shown as the board's tooltip; pass ``repr(inspector)``, whose URLs
        are masked (never a raw URL).
    actions
        ``Inspector.actions()``: the latest one is named under the board
        (:func:`last_action_text`, class ``tk-last-action``); none, nothing is added.

    Returns
    -------
    str
        One ``<table class="tk-board">``; items to look at are marked
        ``class="tk-alert"`` and drawn in red.
    """
    values = {str(k): int(v) for k, v in summary["value"].fillna(0).items()}
    alerts = board_alerts(values)
    groups = []
    for title, items in _BOARD:
        cells = "".join(
            f"<td class='{'tk-alert' if key in alerts else 'tk-ok'}' data-item='{key}' "
            f"style='padding:2px 10px;text-align:center;{'color:#d62728;' if key in alerts else ''}'>"
            f"<b style='font-size:1.3em'>{values.get(key, 0)}</b><br>{html.escape(label)}</td>"
            for label, key in items)
        groups.append(f"<td style='padding:0 6px;border-left:3px solid #ddd'>"
                      f"<div style='font-size:0.8em;color:#666'>{html.escape(title)}</div>"
                      f"<table><tr>{cells}</tr></table></td>")
    last = last_action_text(actions) if actions is not None else ""
    note = (f"<tr><td colspan='{len(groups)}' class='tk-last-action' "
            f"style='font-size:0.8em;color:#666;padding:2px 6px'>{html.escape(last)}</td></tr>"
            if last else "")
    return (f"<table class='tk-board' title='{html.escape(source, quote=True)}'>"
            f"<tr>{''.join(groups)}</tr>{note}</table>")


# -- jobs table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobsTable:
    """What the jobs table shows.

    Attributes
    ----------
    frame
        The rows shown (display columns, already formatted as text).
    total
        How many jobs the filters selected.
    filters
        The filters, for the caption.
    workflow_names
        ``{workflow_id: name}``, for the caption.
    """

    frame: pd.DataFrame
    total: int
    filters: Filters
    workflow_names: Mapping[str, str] = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        """How many selected jobs are not shown."""
        return self.total - len(self.frame)

    def note(self) -> str:
        """Return the caption, e.g. ``"failed jobs: 50 of 230 shown (180 hidden)"``."""
        what = self.filters.describe(self.workflow_names)
        if self.hidden:
            return f"{what}: {len(self.frame)} of {self.total} shown ({self.hidden} hidden)"
        return f"{what}: {self.total} job{'s' if self.total != 1 else ''}"

    def to_html(self) -> str:
        """Return the table as HTML (every cell escaped), with the caption above it."""
        head = "".join(f"<th style='text-align:left;padding:1px 6px'>{c}</th>"
                       for c in self.frame.columns)
        rows = "".join(_row_html(row) for row in self.frame.itertuples(index=False))
        return (f"<div class='tk-jobs' data-total='{self.total}' data-shown='{len(self.frame)}'>"
                f"<div class='tk-jobs-note' style='color:#555'>{html.escape(self.note())}</div>"
                f"<table class='tk-jobs-table' style='font-size:0.85em;border-collapse:collapse'>"
                f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")


def _row_html(row: Sequence[Any]) -> str:
    cells = []
    for column, value in zip(_TABLE_COLUMNS, row, strict=True):
        style = "padding:1px 6px;border-top:1px solid #eee"
        if column == "status":
            style += f";color:{_STATUS_COLOURS.get(str(value), '#000')};font-weight:bold"
        cells.append(f"<td class='tk-col-{column}' style='{style}'>{html.escape(str(value))}</td>")
    return f"<tr>{''.join(cells)}</tr>"


def _order_jobs(jobs: pd.DataFrame) -> pd.DataFrame:
    """Sort jobs for the table: by :data:`STATUS_RANK`, then most recently updated first."""
    rank = jobs["status"].astype(str).map(STATUS_RANK).fillna(len(STATUS_RANK))
    keyed = pd.DataFrame({"rank": rank.to_numpy(), "updated": jobs["updated_at"].to_numpy(),
                          "id": jobs.index.astype(str)})
    keyed = keyed.sort_values(["rank", "updated", "id"], ascending=[True, False, True],
                              na_position="last", kind="stable")
    return jobs.iloc[keyed.index.to_numpy()]


def jobs_table(jobs: pd.DataFrame, workflows: pd.DataFrame, filters: Filters | None = None, *,
               limit: int = DEFAULT_LIMIT) -> JobsTable:
    """Choose and format the rows of the jobs table.

    Parameters
    ----------
    jobs
        The selected jobs (schema of ``Inspector.jobs()``).
    workflows
        ``Inspector.workflows()``, to show workflow names instead of ids.
    filters
        The filters that selected ``jobs`` (for the caption).
    limit
        Show at most this many rows; the caption tells how many were hidden.

    Returns
    -------
    JobsTable

    Raises
    ------
    ValidationError
        ``limit`` is below 1.
    """
    if limit < 1:
        raise errors.ValidationError("limit", limit, "must be at least 1")
    shown = _order_jobs(jobs).head(limit)
    names = workflows["name"].astype(str)
    out = pd.DataFrame({
        "job": [str(i)[:8] for i in shown.index],
        "name": shown["name"].fillna("").astype(str).to_numpy(),
        "workflow": shown["workflow_id"].map(names).fillna("").astype(str).to_numpy(),
        "status": shown["status"].astype(str).to_numpy(),
        "queue": shown["queue"].fillna("").astype(str).to_numpy(),
        "priority": shown["priority"].astype(str).to_numpy(),
        "attempts": [f"{a}/{m}" for a, m in zip(shown["attempts"], shown["max_attempts"], strict=True)],
        "worker": shown["worker_id"].fillna("").astype(str).to_numpy(),
        "wait_s": _seconds_text(shown["wait_s"]),
        "duration_s": _seconds_text(shown["duration_s"]),
        "updated": shown["updated_at"].dt.strftime("%H:%M:%S").fillna("").to_numpy(),
        "error": shown["error"].fillna("").astype(str).str.slice(0, 60).to_numpy(),
    }, columns=list(_TABLE_COLUMNS))
    return JobsTable(out, len(jobs), filters or Filters(), {str(k): v for k, v in names.items()})


def _seconds_text(values: pd.Series) -> list[str]:
    return ["" if pd.isna(v) else f"{float(v):.2f}" for v in values]

