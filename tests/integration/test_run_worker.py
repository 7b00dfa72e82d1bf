"""``sm.run_worker``: the worker loop, against real servers and a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import toolkit
from toolkit import errors


def _workflow(sm: toolkit.StateManager, n: int, **spec: Any) -> toolkit.Workflow:
    return sm.create_workflow("loop", jobs=[{"name": f"j{i}", "payload": {"i": i}, **spec}
                                            for i in range(n)])


def test_burst_runs_every_job_and_stores_the_handler_results(sm: toolkit.StateManager) -> None:
    wf = _workflow(sm, 7)
    sm.register_worker("w1")
    report = sm.run_worker("w1", lambda job: {"double": job.payload["i"] * 2}, idle_timeout=0)
    assert (report.completed, report.failed, report.returned) == (7, 0, 0)
    assert report.stopped_by == "idle"
    jobs = sm.list_jobs(workflow_id=wf.id)
    assert sorted(j.result["double"] for j in jobs) == [0, 2, 4, 6, 8, 10, 12]
    assert {j.status for j in jobs} == {"completed"}
    assert sm.get_workflow(wf.id).status == "completed"


def test_a_raising_handler_fails_the_job_with_the_exception_text(sm: toolkit.StateManager) -> None:
    wf = _workflow(sm, 2, max_attempts=1)

    def handler(job: toolkit.Job) -> None:
        if job.payload["i"] == 1:
            raise ValueError("the dependency is down")

    sm.register_worker("w1")
    report = sm.run_worker("w1", handler, idle_timeout=0)
    assert (report.completed, report.failed) == (1, 1)
    failed = [j for j in sm.list_jobs(workflow_id=wf.id) if j.status == "failed"]
    assert [j.error for j in failed] == ["ValueError: the dependency is down"]


@pytest.mark.parametrize("max_jobs", [6, 3])
def test_max_jobs_and_batches_stop_after_that_many_and_claim_no_more(
        sm: toolkit.StateManager, max_jobs: int) -> None:
    wf = _workflow(sm, 10)
    sm.register_worker("w1")
    report = sm.run_worker("w1", lambda job: None, batch=4, max_jobs=max_jobs)
    assert report.completed == max_jobs
    assert report.stopped_by == "max_jobs"
    # No claim goes past the limit: 6 is a batch of 4, then 2 claimed with its completion;
    # 3 is one claim of 3. Nothing is claimed only to be given back.
    assert report.returned == 0
    by_status: dict[str, int] = {}
    for j in sm.list_jobs(workflow_id=wf.id):
        by_status[j.status] = by_status.get(j.status, 0) + 1
    assert by_status == {"completed": max_jobs, "queued": 10 - max_jobs}
    assert sm.list_assignments(worker_id="w1", status="active") == []
    # The jobs left are handed out later, each on its first attempt.
    again = sm.run_worker("w1", lambda job: None, idle_timeout=0)
    assert again.completed == 10 - max_jobs
    assert all(j.attempts == 1 for j in sm.list_jobs(workflow_id=wf.id))


def test_an_unknown_worker_is_registered_with_the_queues_given(sm: toolkit.StateManager) -> None:
    sm.create_workflow("q", jobs=[{"name": "a", "queue": "reports"}, {"name": "b"}])
    report = sm.run_worker("fresh", lambda job: job.name, queues=["reports"], idle_timeout=0)
    assert report.completed == 1
    worker = sm.get_worker("fresh")
    assert worker is not None and worker.queues == ("reports",)


def test_the_loop_beats_while_a_long_handler_runs(sm: toolkit.StateManager) -> None:
    _workflow(sm, 1)
    sm.register_worker("slow")
    seen: list[list[str]] = []

    def handler(job: toolkit.Job) -> None:
        time.sleep(sm.settings.heartbeat_ttl * 2)  # longer than a TTL without a beat
        seen.append(sm.inactive_workers())

    report = sm.run_worker("slow", handler, idle_timeout=0)
    assert report.completed == 1
    assert seen == [[]]


def test_a_stop_event_ends_the_loop_from_another_thread(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1")
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    started = time.monotonic()
    report = sm.run_worker("w1", lambda job: None, poll=0.1, stop=stop)
    assert report.stopped_by == "stop"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("kwargs, field", [
    ({"batch": 0}, "batch"), ({"batch": 1001}, "batch"), ({"max_jobs": 0}, "max_jobs"),
    ({"idle_timeout": -1.0}, "idle_timeout"), ({"poll": float("nan")}, "poll"),
    ({"queues": "reports"}, "queues"), ({"queues": ["a", "a"]}, "queues"),
])
def test_bad_arguments_are_refused_before_anything_is_written(
        sm: toolkit.StateManager, kwargs: dict[str, Any], field: str) -> None:
    _workflow(sm, 1)
    with pytest.raises(errors.ValidationError) as info:
        sm.run_worker("w9", lambda job: None, **kwargs)
    assert info.value.field == field
    assert sm.get_worker("w9") is None
    assert {j.status for j in sm.list_jobs()} == {"queued"}


def test_a_handler_that_is_not_callable_is_refused(sm: toolkit.StateManager) -> None:
    with pytest.raises(errors.ValidationError) as info:
        sm.run_worker("w9", "not a function")  # type: ignore[arg-type]
    assert info.value.field == "handler"


_CHILD = textwrap.dedent("""
    import sys, time, toolkit
    db, rd, ns, schema, flag = sys.argv[1:6]
    sm = toolkit.init_state_manager(db, rd, namespace=ns, schema=schema, rebuild=False)

    def handler(job):
        open(flag, "a").write(job.id + "\\n")
        time.sleep(1.5)
        return "done"

    report = sm.run_worker("child", handler, batch=5)
    print(report.stopped_by, report.completed, report.returned, sep="|", flush=True)
    sm.close()
""")


def test_sigterm_finishes_the_job_in_hand_and_returns_the_other_claims(
        sm: toolkit.StateManager, clean: Any, tmp_path: Path) -> None:
    wf = _workflow(sm, 8)
    sm.register_worker("child")
    flag = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, clean.database_url, clean.redis_url, clean.namespace,
         clean.schema, str(flag)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ})
    deadline = time.monotonic() + 60
    while not (flag.exists() and flag.read_text().strip()):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the child never started a job"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stopped_by, completed, returned = out.strip().split("|")
    assert stopped_by == "signal SIGTERM"
    in_hand = flag.read_text().split()
    assert len(in_hand) == 1 and completed == "1" and returned == "4"
    jobs = {j.id: j for j in sm.list_jobs(workflow_id=wf.id)}
    assert jobs[in_hand[0]].status == "completed" and jobs[in_hand[0]].result == "done"
    rest = [j for j in jobs.values() if j.id != in_hand[0]]
    assert {j.status for j in rest} == {"queued"}
    assert sm.list_assignments(worker_id="child", status="active") == []
    report = sm.check_consistency()
    assert report.ok, str(report)


def test_a_result_that_is_not_json_fails_its_job_alone(sm: toolkit.StateManager) -> None:
    wf = _workflow(sm, 4, max_attempts=1)
    sm.register_worker("w1")
    bad = sm.list_jobs(workflow_id=wf.id)[1].id
    report = sm.run_worker("w1", lambda job: {1, 2} if job.id == bad else {"ok": True}, batch=4,
                           idle_timeout=0)
    assert (report.completed, report.failed, report.lost) == (3, 1, 0)
    failed = sm.get_job(bad)
    assert failed is not None and failed.status is toolkit.JobStatus.FAILED
    assert failed.error is not None and failed.error.startswith("ValidationError: invalid result=")
