"""``toolkit requeue`` / ``cancel-jobs`` / ``actions``: plan, show, confirm, apply, record."""

from __future__ import annotations

import json

import pytest

import toolkit
from tests.integration.test_bulk_actions import _failed, _state
from tests.integration.test_cli import base, run
from toolkit import cli


def test_a_dry_run_shows_the_plan_and_writes_nothing(sm: toolkit.StateManager, clean, raw_pg,
                                                     raw_redis, capsys) -> None:
    jobs = _failed(sm, 3)
    before = _state(raw_pg, raw_redis, clean)
    assert cli.main(["requeue", "--status", "failed", "--since", "2h", "--reason", "dep back",
                     "--dry-run", "--json", *base(clean)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["planned"] == 3 and sorted(j["job_id"] for j in shown["jobs"]) == \
        sorted(j.id for j in jobs)
    assert shown["counts"] == [{"status": "failed", "queue": "default", "jobs": 3}]
    assert _state(raw_pg, raw_redis, clean) == before


def test_requeue_with_yes_applies_and_actions_lists_it(sm: toolkit.StateManager, clean,
                                                       capsys) -> None:
    jobs = _failed(sm, 3)
    assert cli.main(["requeue", "--status", "failed", "--error", "503", "--reason", "dep back",
                     "--actor", "sre-1", "--yes", "--json", *base(clean)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert (result["applied"], result["skipped"]) == (3, 0)
    assert {sm.get_job(j.id).status for j in jobs} == {"queued"}  # type: ignore[union-attr]
    assert cli.main(["actions", "--format", "json", *base(clean)]) == 0
    actions = json.loads(capsys.readouterr().out)
    assert [(a["action_id"], a["verb"], a["actor"], a["applied"]) for a in actions] == \
        [(result["action_id"], "requeue", "sre-1", 3)]


def test_off_a_terminal_without_yes_nothing_is_applied(sm: toolkit.StateManager, clean) -> None:
    _failed(sm, 2)
    sm.create_workflow("more", jobs=[{"name": "q"}])
    done = run("cancel-jobs", "--status", "queued", "--reason", "x", *base(clean))
    assert done.returncode == 2 and "--yes" in done.stderr
    assert {j.status for j in sm.list_jobs()} == {"failed", "queued"}


@pytest.mark.parametrize("args, message", [
    (["requeue"], "empty filter"),
    (["cancel-jobs", "--payload", "{not json"], "payload"),
    (["requeue", "--since", "2x"], "since"),
    (["cancel-jobs", "--status", "bogus"], "status"),
])
def test_bad_filters_exit_2_with_one_line(clean, args: list[str], message: str) -> None:
    done = run(*args, "--yes", *base(clean))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_help_names_the_exit_codes() -> None:
    for command in ("requeue", "cancel-jobs"):
        out = run(command, "--help").stdout
        assert "--dry-run" in out and "--yes" in out and "exit codes" in out


def _on_a_terminal(args: list[str], answer: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin and stdout; type ``answer`` at the prompt."""
    import os
    import subprocess
    import sys

    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "toolkit", *args], stdin=slave, stdout=slave,
                                stderr=subprocess.PIPE, text=True)
        os.write(master, answer.encode() + b"\n")
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
    finally:
        os.close(master)
        os.close(slave)


def test_on_a_terminal_the_plan_is_applied_only_when_confirmed(sm: toolkit.StateManager,
                                                               clean) -> None:
    _failed(sm, 2)
    args = ["requeue", "--status", "failed", "--reason", "r", *base(clean)]
    code, err = _on_a_terminal(args, "n")
    assert code == 1, err
    assert {j.status for j in sm.list_jobs()} == {"failed"}
    assert sm.inspector.actions().empty
    code, err = _on_a_terminal(args, "y")
    assert code == 0, err
    assert {j.status for j in sm.list_jobs()} == {"queued"}
