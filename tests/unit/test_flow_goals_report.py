"""The flow benchmark's per-round ratio."""

from __future__ import annotations

from benchmarks import flow_goals


def test_the_per_round_ratio_pairs_each_round_of_the_two_sides() -> None:
    ours, floor = [2.0, 1.0, 4.0], [1.0, 1.0, 1.0]  # seconds per round: rates 1/2, 1, 1/4 of it
    assert flow_goals._paired(ours, floor) == {"median": 0.5, "min": 0.25, "max": 1.0, "runs": 3}
    assert flow_goals._paired([1.0], [1.0, 2.0]) is None  # the peers' fewer rounds: no pairs
