"""The dashboard's status board names paused queues (no sockets)."""

from __future__ import annotations

from toolkit.inspection import frames, widgets


def test_a_paused_queue_is_on_the_board_in_red() -> None:
    summary = frames.conform("summary", {"item": ["queue_depth", "queues_paused"], "value": [3, 1]})
    assert "queues_paused" in widgets.board_alerts({"queues_paused": 1})
    assert "queues_paused" not in widgets.board_alerts({"queues_paused": 0})
    html = widgets.summary_html(summary)
    assert "data-item='queues_paused'" in html and ">paused</td>" in html
