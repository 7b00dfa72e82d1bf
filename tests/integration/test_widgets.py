"""toolkit.widgets.Dashboard on real servers: filters, the refresh button, auto-refresh, frames."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest

import toolkit
import toolkit.widgets
from toolkit.widgets import Dashboard


@pytest.fixture
def system(sm: toolkit.StateManager) -> toolkit.StateManager:
    """Two workflows: one with a completed, a failed and a queued job; one all queued."""
    sm.register_worker("w1", queues=("default",))
    sm.register_worker("w2", queues=("default", "reports"))
    sm.heartbeat("w1")
    wf = sm.create_workflow("etl", jobs=[{"name": f"step-{i}"} for i in range(3)])
    sm.create_workflow("reports", jobs=[{"name": f"report-{i}", "queue": "reports"}
                                        for i in range(4)])
    first = sm.dequeue("w1", queues=["default"])
    assert first is not None and first.workflow_id == wf.id
    sm.start_job(first.id)
    sm.complete_job(first.id)
    second = sm.dequeue("w2", queues=["default"])
    assert second is not None
    sm.start_job(second.id)
    sm.fail_job(second.id, "boom", retry=False)
    return sm


@pytest.fixture
def dash(system: toolkit.StateManager) -> Iterator[Dashboard]:
    d = Dashboard(system.inspector, limit=5)
    yield d
    d.close()


def test_dashboard_status_filter_changes_table(dash: Dashboard) -> None:
    before = dash.table.value
    dash.status.value = "failed"
    assert dash.table.value != before
    assert set(dash.frames()["table"]["status"]) == {"failed"}
    assert "status = failed: 1 job" in dash.table.value


def test_dashboard_workflow_and_worker_filters_select_their_jobs(dash: Dashboard,
                                                                  system: toolkit.StateManager) -> None:
    dash.workflow.label = "reports"
    assert set(dash.frames()["table"]["workflow"]) == {"reports"}
    assert dash.jobs_table().total == 4
    dash.workflow.value = ""
    dash.worker.value = "w2"
    jobs = dash.frames()["jobs"]
    assert list(jobs["worker_id"]) == ["w2"] and list(jobs["status"]) == ["failed"]


def test_dashboard_refresh_click_shows_new_jobs(dash: Dashboard, system: toolkit.StateManager) -> None:
    dash.status.value = "queued"
    assert dash.jobs_table().total == 5
    system.create_workflow("late", jobs=[{"name": "late-0"}, {"name": "late-1"}])
    assert dash.jobs_table().total == 5  # nothing is read until a refresh
    refreshes = dash.refreshes
    dash.refresh_button.click()
    assert dash.refreshes == refreshes + 1
    assert dash.jobs_table().total == 7
    assert dash.jobs_table().hidden == 2 and "5 of 7 shown (2 hidden)" in dash.table.value
    assert "late" in [label for label, _ in dash.workflow.options]


def test_dashboard_refresh_keeps_selection_and_drops_a_deleted_one(
        dash: Dashboard, system: toolkit.StateManager) -> None:
    dash.status.value = "completed"
    dash.workflow.label = "reports"
    reports = dash.workflow.value
    dash.refresh_button.click()
    assert (dash.workflow.value, dash.status.value) == (reports, "completed")
    system.delete_workflow(reports)
    dash.refresh_button.click()
    assert dash.workflow.value == "" and dash.filters().workflow_id is None
    assert dash.jobs_table().total == 1


def test_dashboard_board_and_chart_show_the_queue(dash: Dashboard) -> None:
    frames = dash.frames()
    summary = frames["summary"]["value"]
    assert int(summary["queue_depth"]) == 5 and int(summary["jobs_failed"]) == 1
    assert frames["queue_depth"]["depth"].to_dict() == {"default": 1, "reports": 4}
    assert "data-item='jobs_failed'" in dash.board.value
    assert int(frames["throughput"]["jobs_completed"].sum()) == 1
    png = base64.b64decode(dash.chart.outputs[0]["data"]["image/png"])
    assert png.startswith(b"\x89PNG")


def test_dashboard_frames_match_inspector(dash: Dashboard, system: toolkit.StateManager) -> None:
    frames = dash.frames()
    assert set(frames) == {"summary", "workflows", "jobs", "workers", "queue", "throughput",
                           "actions", "table", "queue_depth"}
    assert frames["jobs"].equals(system.inspector.jobs())
    assert frames["actions"].equals(system.inspector.actions())
    assert list(frames["workers"].index) == ["w1", "w2"]


def test_dashboard_auto_refresh_runs_and_stops(dash: Dashboard) -> None:
    assert dash.auto_refresh is None and dash.auto.value is False
    start = dash.refreshes
    dash.start_auto_refresh(0.2)
    assert dash.auto_refresh == 0.2 and dash.auto.value is True
    deadline = time.monotonic() + 10
    while dash.refreshes < start + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    dash.stop_auto_refresh()
    stopped = dash.refreshes
    assert stopped >= start + 2
    time.sleep(0.5)
    assert dash.refreshes == stopped and dash.auto_refresh is None and dash.auto.value is False


def test_dashboard_auto_checkbox_starts_timer(dash: Dashboard) -> None:
    dash.interval.value = 1.5
    dash.auto.value = True
    assert dash.auto_refresh == 1.5
    dash.auto.value = False
    assert dash.auto_refresh is None


def test_dashboard_bad_interval_raises_validation_error(dash: Dashboard) -> None:
    with pytest.raises(toolkit.ValidationError, match="auto_refresh"):
        dash.start_auto_refresh(0)
    assert dash.auto_refresh is None


def test_dashboard_display_bundle_has_widget_and_stable_text(dash: Dashboard) -> None:
    bundle = dash._repr_mimebundle_()
    assert bundle["text/plain"] == "<toolkit.widgets.Dashboard: all jobs>"
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == dash.widget.model_id


def test_dashboard_outside_ipython_returns_plain_frames(system: toolkit.StateManager) -> None:
    assert toolkit.widgets.in_notebook() is False
    frames = toolkit.widgets.dashboard(system.inspector, limit=2)
    assert isinstance(frames, dict)
    assert len(frames["table"]) == 2 and len(frames["jobs"]) == 7


def test_dashboard_unreachable_servers_raise_storage_unavailable() -> None:
    ins = toolkit.Inspector("postgresql://postgres:pw@127.0.0.1:1/test", "redis://127.0.0.1:1/0")
    try:
        with pytest.raises(toolkit.StorageUnavailable) as info:
            Dashboard(ins)
    finally:
        ins.close()
    assert ":pw@" not in str(info.value)
