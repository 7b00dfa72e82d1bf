"""Bulk actions under faults: a coordinator SIGKILLed in the middle of an apply, and workers
finishing jobs while an apply runs. Issue 16, reliability."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest

import toolkit
from tests.conftest import Servers
from toolkit import errors

_APPLY_AND_DIE = textwrap.dedent("""
    import os, pickle, signal, sys
    import toolkit
    from toolkit import failpoints

    db, rd, ns, schema, path = sys.argv[1:6]
    plan = pickle.loads(open(path, "rb").read())
    sm = toolkit.init_state_manager(db, rd, namespace=ns, schema=schema)
    seen = []

    def die(action):
        if action == "bulk " + plan.verb:
            seen.append(action)
            if len(seen) == 3:  # the third batch committed; Redis never hears of it
                os.kill(os.getpid(), signal.SIGKILL)

    failpoints.arm("after_commit", die)
    sm.apply_action(plan, batch=10, progress=False)
    print("not killed", flush=True)
""")


def _manager(clean: Servers) -> toolkit.StateManager:
    return toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                      schema=clean.schema)


def _fail_all(sm: toolkit.StateManager, n: int) -> list[toolkit.Job]:
    wf = sm.create_workflow("incident", jobs=[{"name": f"j{i:03}", "max_attempts": 1}
                                              for i in range(n)])
    sm.register_worker("w-broken")
    for _ in range(n):
        job = sm.dequeue("w-broken")
        assert job is not None
        sm.start_job(job.id)
        sm.fail_job(job.id, "upstream 503", retry=False)
    return sm.list_jobs(workflow_id=wf.id)


@pytest.mark.parametrize("verb, after", [("requeue", "queued"), ("delete", None)])
def test_sigkill_mid_apply_then_a_second_apply_finishes_the_rest(
        clean: Servers, tmp_path: Path, verb: str, after: str | None) -> None:
    sm = _manager(clean)
    try:
        jobs = _fail_all(sm, 60)
        plan = sm.plan_action(verb, status="failed", reason="dependency is back", actor="sre-1")
        assert len(plan.frame) == 60
        (tmp_path / "plan.pkl").write_bytes(pickle.dumps(plan))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        child = subprocess.run(
            [sys.executable, "-c", _APPLY_AND_DIE, clean.database_url, clean.redis_url,
             clean.namespace, clean.schema, str(tmp_path / "plan.pkl")],
            env=env, capture_output=True, text=True, timeout=120)
        assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr

        # Every job is changed or unchanged, never half: 3 batches of 10 committed, or 4 when
        # the 4th committed while the 3rd's Redis update (where it died) ran behind it.
        by_id = {j.id: j for j in jobs}
        now = {j.id: j for j in sm.list_jobs()}
        changed = [i for i in by_id if i not in now or now[i].version != by_id[i].version]
        assert len(changed) in (30, 40)
        assert all((now[i].status if i in now else None) == after for i in changed)
        assert all(now[i].status == "failed" and now[i].version == by_id[i].version
                   for i in by_id if i not in changed)
        row = sm.inspector.actions().loc[plan.id]
        assert (row["planned"], row["applied"], row["status"]) == (60, len(changed), "applying")
        assert not sm.check_consistency().ok  # the fault was real: the 3rd batch never reached Redis

        again = sm.apply_action(plan, batch=10, progress=False)
        assert (again.applied, again.already, again.skipped) == (60 - len(changed), len(changed), 0)
        assert {j.status for j in sm.list_jobs()} == ({after} if after else set())
        row = sm.inspector.actions().loc[plan.id]
        assert (row["planned"], row["applied"], row["skipped"], row["status"]) == \
            (60, 60, 0, "finished")
        report = sm.check_consistency()
        assert report.ok, str(report)
        events = sm.inspector.events()
        mine = events[(events["event"] == (after or "deleted"))
                      & events["detail"].fillna("").str.contains(plan.id)]
        assert sorted(mine["job_id"]) == sorted(by_id)  # exactly one requeue per job
    finally:
        sm.close()


def test_a_worker_finishing_jobs_during_an_apply_is_never_overwritten(clean: Servers) -> None:
    sm = _manager(clean)
    worker = _manager(clean)
    try:
        wf = sm.create_workflow("busy", jobs=[{"name": f"j{i:03}"} for i in range(200)])
        plan = sm.plan_action("cancel", workflow_id=wf.id, reason="bad deploy", actor="sre-1")
        assert len(plan.frame) == 200
        finished: list[str] = []
        overwritten: list[str] = []
        stop = threading.Event()

        def work() -> None:
            worker.register_worker("w1")
            while not stop.is_set():
                job = worker.dequeue("w1")
                if job is None:
                    return
                try:
                    worker.start_job(job.id, worker_id="w1", attempt=job.attempts)
                    worker.complete_job(job.id, {"by": "w1"}, worker_id="w1", attempt=job.attempts)
                    finished.append(job.id)
                except (errors.InvalidTransition, errors.StaleAttempt):
                    overwritten.append(job.id)  # the apply changed a job the worker held

        thread = threading.Thread(target=work)
        thread.start()
        result = sm.apply_action(plan, batch=20, progress=False)
        stop.set()
        thread.join(30)
        assert finished, "the worker completed nothing during the apply"
        assert overwritten == []
        statuses = {j.id: j for j in sm.list_jobs(workflow_id=wf.id)}
        for job_id in finished:
            assert statuses[job_id].status == "completed"
            assert statuses[job_id].result == {"by": "w1"}
        assert result.applied + result.skipped == 200
        assert set(finished) <= set(result.skipped_ids)
        assert {statuses[i].status for i in set(statuses) - set(result.skipped_ids)} == {"cancelled"}
        report = sm.check_consistency()
        assert report.ok, str(report)
    finally:
        worker.close()
        sm.close()


_APPLY = textwrap.dedent("""
    import pickle, sys
    import toolkit

    db, rd, ns, schema, path = sys.argv[1:6]
    plan = pickle.loads(open(path, "rb").read())
    sm = toolkit.init_state_manager(db, rd, namespace=ns, schema=schema, rebuild=False)
    print("applying", flush=True)
    sm.apply_action(plan, batch=25, progress=False)
    print("not killed", flush=True)
""")


def test_sigkill_at_an_arbitrary_moment_leaves_a_truthful_record(
        clean: Servers, tmp_path: Path, raw_pg) -> None:
    sm = _manager(clean)
    try:
        wf = sm.create_workflow("big", jobs=[{"name": f"j{i:04}"} for i in range(3000)])
        plan = sm.plan_action("cancel", workflow_id=wf.id, reason="bad deploy", actor="sre-1")
        (tmp_path / "plan.pkl").write_bytes(pickle.dumps(plan))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        child = subprocess.Popen(
            [sys.executable, "-c", _APPLY, clean.database_url, clean.redis_url, clean.namespace,
             clean.schema, str(tmp_path / "plan.pkl")], env=env, stdout=subprocess.DEVNULL)
        query = psycopg.sql.SQL("SELECT applied FROM {} WHERE id = %s").format(
            psycopg.sql.Identifier(clean.schema, "operator_actions"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill once some batches are in, wherever it is then
            row = raw_pg.execute(query, (plan.id,)).fetchone()
            if row and row[0] >= 200:
                break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL, "the apply finished before the kill"

        by_id = {j.id: j for j in sm.list_jobs(workflow_id=wf.id)}
        cancelled = [j for j in by_id.values() if j.status == "cancelled"]
        untouched = [j for j in by_id.values() if j.status == "queued"]
        assert len(cancelled) + len(untouched) == 3000  # each job changed or unchanged
        assert 200 <= len(cancelled) < 3000
        record = sm.inspector.actions().loc[plan.id]
        assert (record["applied"], record["status"]) == (len(cancelled), "applying")  # truthful

        again = sm.apply_action(plan, batch=500, progress=False)
        assert (again.applied, again.already, again.skipped) == (len(untouched), len(cancelled), 0)
        assert {j.status for j in sm.list_jobs(workflow_id=wf.id)} == {"cancelled"}
        record = sm.inspector.actions().loc[plan.id]
        assert (record["applied"], record["skipped"], record["status"]) == (3000, 0, "finished")
        report = sm.check_consistency()
        assert report.ok, str(report)
    finally:
        sm.close()
