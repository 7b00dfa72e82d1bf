"""Issue 15 item 5: scheduled jobs and retry waits seen in summary, backlog, Prometheus,
the dashboard board, the CLI and the timeline, against real servers."""

from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd
import pytest

import toolkit
from toolkit import cli
from toolkit.inspection import prometheus, widgets


def _three(sm: toolkit.StateManager) -> dict[str, toolkit.Job]:
    """One job now, one in a minute (default queue), one in two minutes (``later``)."""
    wf = sm.create_workflow("sched", jobs=[{"name": "now"}, {"name": "soon", "delay": 60},
                                            {"name": "late", "delay": 120, "queue": "later"}])
    return {j.name: j for j in sm.list_jobs(workflow_id=wf.id)}


def test_summary_counts_scheduled_jobs_among_the_queued(sm: toolkit.StateManager, ins: Any) -> None:
    _three(sm)
    s = ins.summary()["value"]
    assert s["jobs_queued"] == 3  # every queued job, scheduled or not
    assert s["jobs_scheduled"] == 2  # queued with run_at in the future


def test_backlog_has_the_scheduled_count_and_next_due_time(sm: toolkit.StateManager,
                                                           ins: Any) -> None:
    jobs = _three(sm)
    b = ins.backlog()
    assert b.loc["default", "scheduled"] == 1 and b.loc["later", "scheduled"] == 1
    assert b.loc["default", "next_due"] == pd.Timestamp(jobs["soon"].run_at)
    assert b.loc["later", "next_due"] == pd.Timestamp(jobs["late"].run_at)
    assert str(b["scheduled"].dtype) == "Int64" and str(b["next_due"].dtype) == "datetime64[us, UTC]"


def test_prometheus_has_scheduled_and_next_due_per_queue(sm: toolkit.StateManager,
                                                         ins: Any) -> None:
    jobs = _three(sm)
    lines = prometheus.render(ins).splitlines()

    def sample(name: str, queue: str) -> float:
        return float(next(x for x in lines if x.startswith(f'{name}{{queue="{queue}"}}')).split()[-1])

    assert sample("toolkit_queue_scheduled", "default") == 1.0
    assert sample("toolkit_queue_scheduled", "later") == 1.0
    assert jobs["soon"].run_at is not None
    assert sample("toolkit_queue_next_due_timestamp_seconds", "default") == pytest.approx(
        jobs["soon"].run_at.timestamp(), abs=1e-3)


def test_the_board_shows_scheduled_jobs(sm: toolkit.StateManager, ins: Any) -> None:
    _three(sm)
    html = widgets.summary_html(ins.summary())
    assert "data-item='jobs_scheduled'" in html and ">scheduled</td>" in html


def test_the_cli_shows_run_at_and_the_scheduled_count(sm: toolkit.StateManager, clean: Any,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    jobs = _three(sm)
    base = ["--database-url", clean.database_url, "--redis-url", clean.redis_url,
            "--namespace", clean.namespace, "--schema", clean.schema]
    assert cli.main(["inspect", "jobs", "--format", "json", *base]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["now"]["run_at"] is None and rows["soon"]["run_at"] is not None
    assert pd.Timestamp(rows["soon"]["run_at"]) == pd.Timestamp(jobs["soon"].run_at)
    assert cli.main(["inspect", "summary", *base]) == 0
    table = capsys.readouterr().out
    assert any(line.split() == ["jobs_scheduled", "2"] for line in table.splitlines()), table


def test_the_timeline_shows_the_wait_of_a_backing_off_retry(sm: toolkit.StateManager,
                                                            ins: Any) -> None:
    sm.create_workflow("flaky", jobs=[{"name": "a", "retry": {"base": 0.4, "jitter": 0.0}}])
    sm.register_worker("w")
    a = sm.dequeue("w")
    assert a is not None
    failed = sm.fail_job(a.id, "flaky")
    deadline = time.time() + 5
    while sm.dequeue("w", timeout=0.05) is None:
        assert time.time() < deadline, "the retry never came"
    t = ins.timeline(a.id)
    retried = t[t["event"] == "retried"].iloc[-1]
    assert retried["run_at"] == pd.Timestamp(failed.run_at)
    assert retried["scheduled_s"] == pytest.approx(0.4, abs=0.01)
    assert retried["state_s"] >= retried["scheduled_s"]  # then it waited in the queue, briefly
    others = t[t["event"] != "retried"]
    assert others["run_at"].isna().all() and others["scheduled_s"].isna().all()
    assert str(t["scheduled_s"].dtype) == "Float64"


def test_a_snapshot_answers_the_same_backlog_and_timeline(sm: toolkit.StateManager, ins: Any,
                                                          tmp_path: Any) -> None:
    _three(sm)
    sm.create_workflow("flaky", jobs=[{"name": "a", "retry": {"base": 30.0, "jitter": 0.0}}])
    sm.register_worker("w")
    a = sm.dequeue("w", queues=["default"])
    assert a is not None and a.name in ("now", "a")
    # Whichever it is waits 30 s ("now" has the default backoff, due again within a second:
    # due between the snapshot and the live read, it was counted once and not the other time).
    sm.fail_job(a.id, "flaky", retry_in=30.0)
    snap = toolkit.Inspector.from_snapshot(ins.snapshot(tmp_path / "snap"))
    live, stored = ins.backlog(), snap.backlog()
    assert stored["scheduled"].to_dict() == live["scheduled"].to_dict()
    assert stored["next_due"].to_dict() == live["next_due"].to_dict()
    t = snap.timeline(a.id)
    assert t["run_at"].notna().sum() == 1 and t["scheduled_s"].notna().sum() == 1
