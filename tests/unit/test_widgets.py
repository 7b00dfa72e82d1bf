"""The dashboard's logic (toolkit.inspection.widgets) on hand-made frames: no server, no browser."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pandas as pd
import pytest

import toolkit
import toolkit.widgets
from toolkit.inspection import chart, frames
from toolkit.inspection import widgets as logic

T0 = pd.Timestamp("2024-05-01 12:00:00", tz="UTC")


def job(job_id: str, status: str, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"job_id": job_id, "workflow_id": "wf-a", "name": f"step-{job_id}",
                           "status": status, "queue": "default", "priority": 0, "attempts": 1,
                           "max_attempts": 3, "version": 1, "created_at": T0, "updated_at": T0}
    row.update(extra)
    return row


def jobs_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    return frames.conform("jobs", pd.DataFrame(list(rows)))


def workflows_frame(*pairs: tuple[str, str]) -> pd.DataFrame:
    return frames.conform("workflows", {"workflow_id": [p[0] for p in pairs],
                                        "name": [p[1] for p in pairs],
                                        "status": ["running"] * len(pairs)})


def summary_frame(**values: float) -> pd.DataFrame:
    return frames.conform("summary", {"item": list(values), "value": list(values.values())})


def test_filters_unknown_status_raises_validation_error() -> None:
    with pytest.raises(toolkit.ValidationError, match="status"):
        logic.Filters(status="exploded")


def test_filters_describe_uses_workflow_name() -> None:
    f = logic.Filters(workflow_id="wf-a", status="failed")
    assert f.describe({"wf-a": "nightly"}) == "workflow = nightly, status = failed"
    assert logic.Filters().describe() == "all jobs"


def test_filter_jobs_by_worker_keeps_only_that_worker() -> None:
    jobs = jobs_frame(job("1", "running", worker_id="w1"), job("2", "running", worker_id="w2"),
                      job("3", "queued"))
    assert list(logic.filter_jobs(jobs, logic.Filters(worker_id="w1")).index) == ["1"]


def test_filter_jobs_combined_filters_intersect() -> None:
    jobs = jobs_frame(job("1", "failed", workflow_id="wf-a"), job("2", "failed", workflow_id="wf-b"),
                      job("3", "completed", workflow_id="wf-b"))
    picked = logic.filter_jobs(jobs, logic.Filters(workflow_id="wf-b", status="failed"))
    assert list(picked.index) == ["2"]
    assert picked.dtypes.equals(jobs.dtypes)


def test_workflow_options_shared_names_get_id_prefix() -> None:
    options = logic.workflow_options(workflows_frame(("aaaaaaaa-1", "etl"), ("bbbbbbbb-2", "etl"),
                                                     ("cccccccc-3", "reports")))
    assert options[0] == (logic.ALL_LABEL, None)
    assert options[1:] == [("etl (aaaaaaaa)", "aaaaaaaa-1"), ("etl (bbbbbbbb)", "bbbbbbbb-2"),
                           ("reports", "cccccccc-3")]


def test_worker_options_marks_dead_workers() -> None:
    workers = frames.conform("workers", {"worker_id": ["w1", "w2"], "status": ["active", "active"],
                                         "alive": [True, False]})
    assert logic.worker_options(workers) == [(logic.ALL_LABEL, None), ("w1", "w1"),
                                             ("w2 (dead)", "w2")]


def test_status_options_offer_every_job_status() -> None:
    values = [v for _, v in logic.status_options()]
    assert values == [None, *[s.value for s in toolkit.JobStatus]]


def test_jobs_table_limit_notes_hidden_rows() -> None:
    jobs = jobs_frame(*[job(str(i), "completed") for i in range(7)])
    table = logic.jobs_table(jobs, workflows_frame(("wf-a", "etl")), limit=3)
    assert (len(table.frame), table.total, table.hidden) == (3, 7, 4)
    assert table.note() == "all jobs: 3 of 7 shown (4 hidden)"
    assert "data-shown='3'" in table.to_html() and "4 hidden" in table.to_html()


def test_jobs_table_orders_live_work_first_then_latest_update() -> None:
    jobs = jobs_frame(job("done", "completed"), job("old-fail", "failed"),
                      job("new-fail", "failed", updated_at=T0 + pd.Timedelta(seconds=5)),
                      job("run", "running"), job("wait", "queued"))
    table = logic.jobs_table(jobs, workflows_frame(("wf-a", "etl")))
    assert list(table.frame["job"]) == ["run", "wait", "new-fail", "old-fail", "done"]
    assert set(table.frame["workflow"]) == {"etl"}


def test_jobs_table_html_escapes_cells() -> None:
    jobs = jobs_frame(job("1", "failed", error="<script>alert(1)</script>"))
    html = logic.jobs_table(jobs, workflows_frame(("wf-a", "etl"))).to_html()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_jobs_table_limit_below_one_raises_validation_error() -> None:
    with pytest.raises(toolkit.ValidationError, match="limit"):
        logic.jobs_table(jobs_frame(job("1", "queued")), workflows_frame(), limit=0)


def test_jobs_table_empty_selection_notes_zero_jobs() -> None:
    table = logic.jobs_table(frames.empty("jobs"), frames.empty("workflows"),
                             logic.Filters(status="failed"))
    assert table.note() == "status = failed: 0 jobs"
    assert table.frame.empty


def test_summary_html_backlog_without_live_workers_is_alert() -> None:
    board = logic.summary_html(summary_frame(queue_depth=10, workers=3, workers_alive=0,
                                             jobs_failed=0))
    assert "class='tk-alert' data-item='queue_depth'" in board
    assert "class='tk-alert' data-item='workers_alive'" in board
    assert "class='tk-ok' data-item='jobs_failed'" in board


def test_summary_html_healthy_system_has_no_alert() -> None:
    values = {"queue_depth": 4, "workers": 2, "workers_alive": 2, "jobs_failed": 0}
    assert logic.board_alerts(values) == set()
    assert "tk-alert" not in logic.summary_html(summary_frame(**values))


def test_summary_html_source_never_shows_password() -> None:
    ins = toolkit.Inspector("postgresql://app:s3cret-pw@127.0.0.1:5432/test",
                            "redis://:s3cret-pw@127.0.0.1:6379/0", namespace="wf")
    try:
        board = logic.summary_html(summary_frame(workflows=1), source=repr(ins))
    finally:
        ins.close()
    assert "s3cret-pw" not in board and "127.0.0.1:5432" in board


def test_chart_data_counts_waiting_jobs_per_queue_without_in_flight() -> None:
    queue = frames.conform("queue", {"job_id": ["1", "2", "3", "4"],
                                     "queue": ["reports", "default", "reports", None],
                                     "in_flight": [False, False, False, True]})
    series = pd.DataFrame({"jobs_completed": [3, 5]},
                          index=pd.DatetimeIndex([T0, T0 + pd.Timedelta(minutes=1)], name="time"))
    data = chart.chart_data(queue, series, bins=1)
    assert data.queue_depth.to_dict() == {"default": 1, "reports": 2}
    assert list(data.throughput.columns) == list(chart.THROUGHPUT_METRICS)
    assert data.throughput.to_dict("list") == {"jobs_completed": [5], "jobs_failed": [0]}


def test_chart_png_draws_png_even_without_data() -> None:
    empty = chart.chart_data(frames.empty("queue"), pd.DataFrame(
        {n: pd.Series([], dtype="Int64") for n in chart.THROUGHPUT_METRICS},
        index=pd.DatetimeIndex([], tz="UTC")))
    assert toolkit.widgets.chart_png(empty).startswith(b"\x89PNG\r\n")


def test_import_toolkit_does_not_import_widget_libraries() -> None:
    code = ("import sys, toolkit, toolkit.inspection.widgets; "
            "print(sorted(m for m in ('ipywidgets', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _actions(**row: Any) -> pd.DataFrame:
    at = pd.Timestamp("2026-11-29T10:00:00Z")
    base = {"verb": "requeue", "status": "finished", "actor": "sre-1", "reason": "dep <back>",
            "planned": 230, "applied": 228, "skipped": 2, "value": None, "filter": "{}",
            "created_at": at, "updated_at": at, "finished_at": at}
    df = pd.DataFrame([{**base, **row}], index=pd.Index(["a1"], name="action_id"))
    return frames.conform("actions", df)


def test_summary_html_names_the_latest_bulk_action_escaped() -> None:
    board = logic.summary_html(summary_frame(), actions=_actions())
    assert "tk-last-action" in board
    assert "requeue by sre-1" in board and "228 applied, 2 skipped" in board
    assert "dep &lt;back&gt;" in board and "<back>" not in board


def test_summary_html_without_actions_is_unchanged() -> None:
    plain = logic.summary_html(summary_frame())
    assert logic.summary_html(summary_frame(), actions=frames.empty("actions")) == plain
    assert "tk-last-action" not in plain
