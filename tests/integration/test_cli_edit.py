"""``toolkit edit JOB``: change a waiting job's priority, queue or due time from the shell."""

from __future__ import annotations

import pytest

import toolkit
from tests.integration.test_cli import base, run
from tests.integration.test_cli_bulk import _on_a_terminal
from toolkit import cli


def _job(sm: toolkit.StateManager) -> toolkit.Job:
    wf = sm.create_workflow("edit", jobs=[{"name": "a"}])
    return sm.list_jobs(workflow_id=wf.id)[0]


def test_edit_with_yes_changes_the_job_and_names_actor_and_reason(sm: toolkit.StateManager, clean,
                                                                  capsys) -> None:
    job = _job(sm)
    assert cli.main(["edit", job.id, "--priority", "9", "--queue", "urgent", "--delay", "1h",
                     "--reason", "escalation", "--actor", "sre-1", "--yes", *base(clean)]) == 0
    out = capsys.readouterr().out
    assert job.id in out and "priority 0 -> 9" in out and "queue default -> urgent" in out
    after = sm.get_job(job.id)
    assert after is not None and (after.priority, after.queue) == (9, "urgent")
    assert after.run_at is not None
    events = sm.inspector.events(job_id=job.id)
    assert "sre-1" in events[events["event"] == "edited"].iloc[0]["detail"]


def test_edit_run_at_takes_an_iso_time(sm: toolkit.StateManager, clean) -> None:
    job = _job(sm)
    assert cli.main(["edit", job.id, "--run-at", "2099-01-01T00:00:00Z", "--yes",
                     *base(clean)]) == 2  # beyond the furthest schedule: refused
    assert sm.get_job(job.id).version == job.version  # type: ignore[union-attr]


@pytest.mark.parametrize("args, message", [
    ([], "give a priority, a queue or a due time"),
    (["--priority", "x"], "priority"),
    (["--delay", "2x"], "delay"),
    (["--run-at", "soon"], "run-at"),
    (["--delay", "1h", "--run-at", "2026-01-01T00:00Z"], "not allowed with"),
])
def test_bad_edits_exit_2_and_change_nothing(sm: toolkit.StateManager, clean, args: list[str],
                                            message: str) -> None:
    job = _job(sm)
    done = run("edit", job.id, *args, "--yes", *base(clean))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert sm.get_job(job.id).version == job.version  # type: ignore[union-attr]


def test_an_unknown_or_started_job_exits_1(sm: toolkit.StateManager, clean) -> None:
    done = run("edit", "no-such-job", "--priority", "1", "--yes", *base(clean))
    assert done.returncode == 1 and "NotFound" in done.stderr
    job = _job(sm)
    sm.register_worker("w1")
    sm.dequeue("w1")
    done = run("edit", job.id, "--priority", "1", "--yes", *base(clean))
    assert done.returncode == 1 and "InvalidTransition" in done.stderr


def test_on_a_terminal_the_edit_is_made_only_when_confirmed(sm: toolkit.StateManager, clean) -> None:
    job = _job(sm)
    args = ["edit", job.id, "--priority", "7", *base(clean)]
    code, err = _on_a_terminal(args, "n")
    assert code == 1, err
    assert sm.get_job(job.id).priority == 0  # type: ignore[union-attr]
    code, err = _on_a_terminal(args, "y")
    assert code == 0, err
    assert sm.get_job(job.id).priority == 7  # type: ignore[union-attr]


def test_help_names_the_options_and_exit_codes() -> None:
    out = run("edit", "--help").stdout
    for word in ("--priority", "--queue", "--run-at", "--delay", "--yes", "exit codes"):
        assert word in out
