"""Fault scenarios against live servers, shared by the CLI, the notebooks and the tests.

Each scenario function injects a real fault, checks what the design promises,
and returns a :class:`ScenarioResult` with before/after frames, timings and a
verdict. Nothing here is a mock: processes are really killed, servers really
restarted.
"""

from __future__ import annotations

from toolkit.scenarios.common import (
    Say,
    ScenarioResult,
    Target,
    cleanup,
    drop_schema,
    fresh_names,
    sandbox,
    status_counts,
    target,
    wipe_namespace,
)
from toolkit.scenarios.crash import commit_then_crash, coordinator_crash
from toolkit.scenarios.faults import (
    postgres_unavailable,
    racing_coordinators,
    redis_loss,
    worker_failure,
)

__all__ = [
    "Say", "ScenarioResult", "Target", "cleanup", "commit_then_crash", "coordinator_crash",
    "drop_schema", "fresh_names", "postgres_unavailable", "racing_coordinators", "redis_loss",
    "sandbox", "status_counts", "target", "wipe_namespace", "worker_failure",
]
