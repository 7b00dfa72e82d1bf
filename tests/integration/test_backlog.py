"""Backlog gauges per queue: oldest wait, arrival and dispatch rates, time to drain."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pandas as pd
import pytest

import toolkit
from toolkit import errors
from toolkit.inspection import prometheus, widgets


def test_a_draining_queue_has_rates_an_age_and_an_eta(sm: toolkit.StateManager, ins: Any) -> None:
    sm.create_workflow("wf", jobs=[{"name": f"j{i}"} for i in range(10)])
    sm.create_workflow("other", jobs=[{"name": "r", "queue": "reports"}])
    time.sleep(1.5)  # every arrival is now older than a 1 s window
    sm.register_worker("w")
    for _ in range(6):
        assert sm.dequeue("w", queues=["default"]) is not None
    b = ins.backlog(window=1.0)
    row = b.loc["default"]
    assert row["depth"] == 4
    assert row["oldest_age_s"] >= 1.5
    assert row["enqueued_per_s"] == 0.0 and row["dispatched_per_s"] == 6.0
    assert row["drain_eta_s"] == pytest.approx(4 / 6)
    idle = b.loc["reports"]  # waiting, nothing moving: no estimate
    assert idle["depth"] == 1 and idle["dispatched_per_s"] == 0.0
    assert pd.isna(idle["drain_eta_s"])
    wide = ins.backlog(window=600.0).loc["default"]  # the arrivals are inside a wide window
    assert wide["enqueued_per_s"] == pytest.approx(10 / 600)
    assert wide["dispatched_per_s"] == pytest.approx(6 / 600)
    assert str(b["depth"].dtype) == "Int64" and str(b["drain_eta_s"].dtype) == "Float64"


def test_summary_prometheus_and_board_show_the_oldest_wait(sm: toolkit.StateManager, ins: Any) -> None:
    sm.create_workflow("wf", jobs=[{"name": "a"}])
    time.sleep(1.1)
    summary = ins.summary()["value"]
    assert summary["oldest_queued_age_s"] >= 1
    text = prometheus.render(ins)
    line = next(x for x in text.splitlines()
                if x.startswith('toolkit_queue_oldest_age_seconds{queue="default"}'))
    assert float(line.split()[-1]) >= 1.0
    assert "toolkit_queue_dispatch_rate" in text
    assert "oldest_queued_age_s" in widgets.board_alerts({"oldest_queued_age_s": 901})
    assert "oldest_queued_age_s" not in widgets.board_alerts({"oldest_queued_age_s": 30})


def test_the_cli_prints_the_backlog(sm: toolkit.StateManager, clean: Any) -> None:
    sm.create_workflow("wf", jobs=[{"name": "a"}, {"name": "b"}])
    out = subprocess.run([sys.executable, "-m", "toolkit", "inspect", "backlog", "--format", "json",
                          "--database-url", clean.database_url, "--redis-url", clean.redis_url,
                          "--namespace", clean.namespace, "--schema", clean.schema],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["queue"], r["depth"]) for r in rows] == [("default", 2)]


@pytest.mark.parametrize("bad", [0, -5, float("nan"), "15m", None])
def test_a_bad_window_is_refused(ins: Any, bad: Any) -> None:
    with pytest.raises(errors.ValidationError):
        ins.backlog(window=bad)
