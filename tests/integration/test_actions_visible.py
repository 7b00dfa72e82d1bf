"""The record of bulk actions travels: in snapshots (masked) and on the dashboard."""

from __future__ import annotations

import pandas as pd

import toolkit
import toolkit.widgets
from tests.integration.test_bulk_actions import _failed
from toolkit.inspection import frames

SECRET = "Zq9tok@Xk7pw"


def _act(sm: toolkit.StateManager) -> None:
    _failed(sm, 3)
    sm.apply_action(sm.plan_action("requeue", status="failed", reason="dep back", actor="sre-1"),
                    progress=False)
    sm.apply_action(sm.plan_action("cancel", payload={"api_key": SECRET}, reason="leak",
                                   actor="sre-2"), progress=False)


def test_a_snapshot_keeps_the_actions_masked_and_an_older_one_reads_as_none(sm, tmp_path) -> None:
    _act(sm)
    live = sm.inspector.actions()
    assert len(live) == 2
    path = sm.inspector.snapshot(tmp_path / "snap")
    off = toolkit.Inspector.from_snapshot(path)
    pd.testing.assert_frame_equal(off.actions(), live)
    assert SECRET not in (path / "actions.parquet").read_bytes().decode("latin-1")
    assert off.actions().loc[live.index[0], "applied"] == 3
    (path / "actions.parquet").unlink()  # a snapshot taken before actions were recorded
    older = toolkit.Inspector.from_snapshot(path)
    pd.testing.assert_frame_equal(older.actions(), frames.empty("actions"))


def test_the_dashboard_shows_the_latest_action(sm) -> None:
    _act(sm)
    shown = toolkit.widgets.dashboard(sm.inspector)
    assert list(shown["actions"].index) == list(sm.inspector.actions().index)
    from toolkit.inspection import widgets as logic

    snap = logic.take_snapshot(sm.inspector)
    board = logic.summary_html(snap.summary, actions=snap.actions)
    assert "cancel by sre-2" in board and SECRET not in board
