"""Every scenario of DESIGN.md, run for real on this session's servers; each must PASS."""

from __future__ import annotations

import pytest

import toolkit
from toolkit import scenarios


@pytest.fixture
def target(servers) -> scenarios.Target:
    return scenarios.Target(servers.database_url, servers.redis_url, servers.embedded)


@pytest.mark.parametrize("scenario", [
    scenarios.redis_loss,
    scenarios.worker_failure,
    scenarios.commit_then_crash,
    scenarios.postgres_unavailable,
    scenarios.racing_coordinators,
], ids=lambda f: f.__name__)
def test_scenario_passes(target, scenario) -> None:
    result = scenario(target)
    assert result.ok, str(result)
    assert list(result.before.columns) == ["jobs"] and list(result.after.columns) == ["jobs"]
    assert result.timings and all(v >= 0 for v in result.timings.values())


def test_coordinator_crash_kills_with_jobs_in_flight_and_reclaims_them(target) -> None:
    """Killed on progress (about half acknowledged, jobs in flight), never after all work is done."""
    result = scenarios.coordinator_crash(target, workflows=4, jobs_per_workflow=10)
    assert result.ok, str(result)
    d = result.details
    assert d["in_flight_at_kill"] > 0 and d["found_in_flight"] > 0, d
    assert d["reclaimed"] > 0, d
    assert d["reclaimed"] == d["reclaimed_completed_once"] + d["reclaimed_failed_by_attempts"], d
    total = 4 * 10
    assert total * 0.3 <= d["finished_at_kill"] < total, d  # about half, not all
    assert result.timings["recovery (connect + rebuild)"] < 10
    assert d["acknowledged_writes"] > 0
    assert "jobs in flight at the kill > 0" in result.checks
    assert "jobs reclaimed > 0" in result.checks


def test_a_broken_expectation_fails_the_verdict() -> None:
    import pandas as pd

    empty = pd.DataFrame({"jobs": []})
    result = scenarios.ScenarioResult("x", {"held": True, "broken": False}, {}, empty, empty)
    assert not result.ok and result.verdict == "FAIL" and "[FAILED] broken" in str(result)


@pytest.mark.parametrize("kill_at", [0.0, 1.0, 1.5])
def test_coordinator_crash_refuses_a_kill_point_that_cannot_leave_work_in_flight(target, kill_at) -> None:
    with pytest.raises(toolkit.ValidationError):
        scenarios.coordinator_crash(target, kill_at=kill_at)
