"""An ipywidgets dashboard over an :class:`toolkit.Inspector`, for SREs in a notebook.

>>> import toolkit.widgets                                  # doctest: +SKIP
>>> toolkit.widgets.dashboard(sm.inspector)                 # doctest: +SKIP

The dashboard shows a summary board, a queue-depth and throughput chart and
the jobs table, with workflow, status and worker filters, a refresh button
and an optional auto-refresh timer. It only reads (the Inspector never
writes). Outside a running IPython kernel, :func:`dashboard` returns the plain
frames instead of widgets, and :meth:`Dashboard.frames` always gives them.

Importing :mod:`toolkit` does not import this module; importing this module
imports ipywidgets (and drawing the chart imports matplotlib).

The logic (filters, table rows, chart data) lives in
:mod:`toolkit.inspection.widgets`; this module only wires it to widgets.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets
import pandas as pd

from toolkit import errors
from toolkit.inspection import widgets as logic
from toolkit.inspection.chart import chart_data, chart_png

if TYPE_CHECKING:
    from toolkit.inspection.inspector import Inspector

__all__ = ["Dashboard", "chart_png", "dashboard", "in_notebook"]

DEFAULT_INTERVAL = 5.0
"""Seconds between automatic refreshes when the auto-refresh box is ticked in the UI."""

_ALL = ""
"""Dropdown value of the "(all)" entry (ipywidgets treats ``None`` as "no selection")."""


def in_notebook() -> bool:
    """Return whether this code runs in an IPython kernel (a notebook, JupyterLab, VS Code)."""
    module = sys.modules.get("IPython")
    if module is None:
        return False
    shell = module.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def dashboard(inspector: Inspector, *, auto_refresh: float | None = None,
              limit: int = logic.DEFAULT_LIMIT) -> Dashboard | dict[str, pd.DataFrame]:
    """Return a :class:`Dashboard` in a notebook, else the frames it would show.

    Parameters
    ----------
    inspector
        What to look at (e.g. ``sm.inspector`` or ``toolkit.Inspector(...)``).
    auto_refresh
        Seconds between automatic refreshes (notebook only); ``None``: off.
    limit
        Rows the jobs table shows at most.

    Returns
    -------
    Dashboard or dict of str to pandas.DataFrame
        The widget in an IPython kernel; outside one, the frames by name
        (``summary``, ``workflows``, ``jobs``, ``workers``, ``queue``,
        ``throughput``, ``actions``, ``table``, ``queue_depth``).
    """
    if in_notebook():
        return Dashboard(inspector, auto_refresh=auto_refresh, limit=limit)
    return _frames_of(logic.take_snapshot(inspector), limit)


def _frames_of(snapshot: logic.Snapshot, limit: int) -> dict[str, pd.DataFrame]:
    table = logic.jobs_table(snapshot.jobs, snapshot.workflows, snapshot.filters, limit=limit)
    chart = chart_data(snapshot.queue, snapshot.throughput)
    return {**snapshot.frames(), "table": table.frame, "queue_depth": chart.queue_depth.to_frame()}


class _Timer:
    """A daemon thread calling ``tick`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float, tick: Callable[[], None]) -> None:
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="toolkit-dashboard-refresh",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 10.0)


class Dashboard:
    """Filters, a summary board, a chart and the jobs table over one Inspector.

    Filter changes apply at once to the jobs table; the refresh button (or
    :meth:`refresh`, or the auto-refresh timer) reads everything again.

    Parameters
    ----------
    inspector
        What to look at; only its masked ``repr`` is ever shown.
    auto_refresh
        Seconds between automatic refreshes on a background thread; ``None``
        (the default) leaves it off. See :meth:`start_auto_refresh`.
    limit
        Rows the jobs table shows at most (a note tells how many were hidden).
    freq
        Bin width of the throughput lines.

    Attributes
    ----------
    workflow, status, worker : ipywidgets.Dropdown
        The filters.
    refresh_button : ipywidgets.Button
    auto : ipywidgets.Checkbox
        Ticking it starts auto-refresh every ``interval.value`` seconds.
    board, table, message : ipywidgets.HTML
        The summary board, the jobs table and the last refresh's outcome.
    chart : ipywidgets.Output
        Queue depth and throughput (a PNG drawn by matplotlib).
    widget : ipywidgets.VBox
        All of it; a Dashboard displays as this widget.
    refreshes : int
        How many refreshes completed.

    Raises
    ------
    ValidationError
        ``auto_refresh`` or ``limit`` is out of range.
    StorageUnavailable
        The first refresh could not read a server.
    """

    def __init__(self, inspector: Inspector, *, auto_refresh: float | None = None,
                 limit: int = logic.DEFAULT_LIMIT, freq: str = logic.DEFAULT_FREQ) -> None:
        if limit < 1:
            raise errors.ValidationError("limit", limit, "must be at least 1")
        self.inspector = inspector
        self.limit = limit
        self.freq = freq
        self.refreshes = 0
        self._lock = threading.RLock()
        self._syncing = False
        self._timer: _Timer | None = None
        self._snapshot: logic.Snapshot | None = None
        self._table: logic.JobsTable | None = None
        self._build()
        self.refresh()
        if auto_refresh is not None:
            self.start_auto_refresh(auto_refresh)

    # -- building ----------------------------------------------------------------------------

    def _build(self) -> None:
        w = ipywidgets
        narrow = w.Layout(width="210px")
        self.workflow = w.Dropdown(description="workflow", options=[(logic.ALL_LABEL, _ALL)],
                                   layout=narrow)
        self.status = w.Dropdown(description="status", options=_entries(logic.status_options()),
                                 layout=narrow)
        self.worker = w.Dropdown(description="worker", options=[(logic.ALL_LABEL, _ALL)],
                                 layout=narrow)
        self.refresh_button = w.Button(description="refresh", icon="refresh",
                                       tooltip="read every tier again", layout=w.Layout(width="100px"))
        self.auto = w.Checkbox(description="auto-refresh", value=False, indent=False,
                               layout=w.Layout(width="110px"))
        self.interval = w.BoundedFloatText(value=DEFAULT_INTERVAL, min=0.5, max=3600.0, step=0.5,
                                           description="every (s)", layout=w.Layout(width="150px"))
        for dropdown, name in ((self.workflow, "workflow"), (self.status, "status"),
                               (self.worker, "worker")):
            dropdown.add_class(f"tk-filter-{name}")
            dropdown.observe(self._on_filter, names="value")
        self.refresh_button.add_class("tk-refresh")
        self.refresh_button.on_click(self._on_click)
        self.auto.observe(self._on_auto, names="value")
        self.board, self.table, self.message = w.HTML(), w.HTML(), w.HTML()
        self.chart = w.Output()
        title = w.HTML(f"<b>toolkit · SRE dashboard</b> <span style='color:#888;font-size:0.8em'>"
                       f"{html.escape(repr(self.inspector))}</span>")
        controls = w.HBox([self.workflow, self.status, self.worker, self.refresh_button,
                           self.auto, self.interval])
        self.widget = w.VBox([title, self.board, controls, self.chart, self.table, self.message])
        self.widget.add_class("tk-dashboard")

    # -- reading -----------------------------------------------------------------------------

    def filters(self) -> logic.Filters:
        """Return the filters the dropdowns select now."""
        return logic.Filters(workflow_id=self.workflow.value or None,
                             status=self.status.value or None, worker_id=self.worker.value or None)

    def refresh(self) -> None:
        """Read every frame again and redraw everything (thread-safe).

        Raises
        ------
        StorageUnavailable
            A server did not answer; what is shown stays as it was.
        """
        with self._lock:
            snapshot = logic.take_snapshot(self.inspector, self.filters(), freq=self.freq)
            self._sync_options(snapshot)
            if snapshot.filters != self.filters():  # a selected entity is gone: read jobs again
                snapshot = self._reselect(snapshot)
            self._snapshot = snapshot
            self._render_board(snapshot)
            self._render_table(snapshot)
            self._render_chart(snapshot)
            self.refreshes += 1
            self._say(f"refreshed at {time.strftime('%H:%M:%S')}"
                      + (f" · auto every {self.auto_refresh:g} s" if self.auto_refresh else ""))

    def frames(self) -> dict[str, pd.DataFrame]:
        """Return the frames shown now, by name (no widgets needed to read them).

        Returns
        -------
        dict of str to pandas.DataFrame
            ``summary``, ``workflows``, ``jobs`` (filtered, all rows),
            ``workers``, ``queue``, ``throughput``, ``actions``, ``table`` (the
            rows the table shows) and ``queue_depth``.
        """
        with self._lock:
            assert self._snapshot is not None  # set by __init__
            return _frames_of(self._snapshot, self.limit)

    def jobs_table(self) -> logic.JobsTable:
        """Return what the jobs table shows now."""
        with self._lock:
            assert self._table is not None  # set by __init__
            return self._table

    def _reselect(self, snapshot: logic.Snapshot) -> logic.Snapshot:
        filters = self.filters()
        jobs = self.inspector.jobs(workflow_id=filters.workflow_id, status=filters.status)
        return dataclasses.replace(snapshot, filters=filters, jobs=logic.filter_jobs(jobs, filters))

    def _sync_options(self, snapshot: logic.Snapshot) -> None:
        self._syncing = True
        try:
            _set_options(self.workflow, logic.workflow_options(snapshot.workflows))
            _set_options(self.worker, logic.worker_options(snapshot.workers))
        finally:
            self._syncing = False

    # -- drawing -----------------------------------------------------------------------------

    def _render_board(self, snapshot: logic.Snapshot) -> None:
        self.board.value = logic.summary_html(snapshot.summary, source=repr(self.inspector),
                                              actions=snapshot.actions)

    def _render_table(self, snapshot: logic.Snapshot) -> None:
        self._table = logic.jobs_table(snapshot.jobs, snapshot.workflows, snapshot.filters,
                                       limit=self.limit)
        self.table.value = self._table.to_html()

    def _render_chart(self, snapshot: logic.Snapshot) -> None:
        png = chart_png(chart_data(snapshot.queue, snapshot.throughput))
        self.chart.outputs = ({"output_type": "display_data", "metadata": {},
                               "data": {"image/png": base64.b64encode(png).decode("ascii"),
                                        "text/plain": "<queue depth and throughput chart>"}},)

    def _say(self, text: str, *, error: bool = False) -> None:
        colour = "#d62728" if error else "#888"
        self.message.value = f"<span style='color:{colour};font-size:0.8em'>{html.escape(text)}</span>"

    # -- events ------------------------------------------------------------------------------

    def _on_filter(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        try:
            with self._lock:
                assert self._snapshot is not None
                self._snapshot = self._reselect(self._snapshot)
                self._render_table(self._snapshot)
        except errors.ToolkitError as exc:
            self._say(f"filter failed: {exc}", error=True)

    def _on_click(self, button: Any) -> None:
        self._safe_refresh()

    def _safe_refresh(self) -> None:
        try:
            self.refresh()
        except errors.ToolkitError as exc:
            self._say(f"refresh failed: {exc}", error=True)

    def _on_auto(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        if change["new"]:
            self.start_auto_refresh(float(self.interval.value))
        else:
            self.stop_auto_refresh()

    # -- auto-refresh ------------------------------------------------------------------------

    @property
    def auto_refresh(self) -> float | None:
        """Seconds between automatic refreshes, or ``None`` when auto-refresh is off."""
        timer = self._timer
        return timer.interval if timer is not None else None

    def start_auto_refresh(self, interval: float) -> None:
        """Refresh every ``interval`` seconds on a daemon thread (replacing any running timer).

        A refresh that fails shows its error and the timer goes on.

        Raises
        ------
        ValidationError
            ``interval`` is not a positive number of seconds.
        """
        if not isinstance(interval, int | float) or isinstance(interval, bool) or not interval > 0:
            raise errors.ValidationError("auto_refresh", interval, "must be a positive number of seconds")
        self.stop_auto_refresh()
        self._timer = _Timer(float(interval), self._safe_refresh)
        self._syncing = True
        try:
            self.interval.value = float(interval)
            self.auto.value = True
        finally:
            self._syncing = False

    def stop_auto_refresh(self) -> None:
        """Stop the auto-refresh timer (waits for a refresh in progress); no-op when off."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.stop()
        self._syncing = True
        try:
            self.auto.value = False
        finally:
            self._syncing = False

    def close(self) -> None:
        """Stop auto-refresh and close the widgets (the Inspector stays open)."""
        self.stop_auto_refresh()
        for child in (self.workflow, self.status, self.worker, self.refresh_button, self.auto,
                      self.interval, self.board, self.table, self.message, self.chart, self.widget):
            child.close()

    # -- display -----------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle: dict[str, Any] = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = repr(self)
        return bundle

    def __repr__(self) -> str:
        return f"<toolkit.widgets.Dashboard: {self.filters().describe()}>"


def _entries(options: list[logic.Option]) -> list[tuple[str, str]]:
    return [(label, _ALL if value is None else value) for label, value in options]


def _set_options(dropdown: Any, options: list[logic.Option]) -> None:
    """Replace a dropdown's entries, keeping its value when it is still offered."""
    entries = _entries(options)
    if list(dropdown.options) == entries:
        return
    current = dropdown.value
    dropdown.options = entries
    dropdown.value = current if current in {v for _, v in entries} else _ALL
