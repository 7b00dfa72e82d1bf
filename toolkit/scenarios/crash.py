"""Coordinator crashes: a busy coordinator SIGKILLed mid-work, and a crash between commit and cache."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from toolkit import config, errors, simulator
from toolkit.scenarios.common import (
    Say,
    ScenarioResult,
    Target,
    cleanup,
    fresh_names,
    quiet,
    status_counts,
)
from toolkit.state import StateManager, init_state_manager


class _Acks:
    """Reads a coordinator child's acknowledgement lines on a thread.

    It also keeps the child's work as its acknowledgements tell it: how many
    completions, and which jobs are in flight (assigned or started, not yet
    completed or failed). With ``kill_when``, the reader SIGKILLs the child
    itself the moment that predicate holds (no clock involved), and keeps the
    counts as they were at the kill.
    """

    def __init__(self, proc: subprocess.Popen[str],
                 kill_when: Callable[[_Acks, dict[str, str]], bool] | None = None) -> None:
        self.records: list[dict[str, str]] = []
        self.ready = threading.Event()
        self.killed = threading.Event()
        self.completed = 0
        self.in_flight: set[str] = set()
        self.at_kill: tuple[int, int] = (0, 0)  # (completions, jobs in flight) when killed
        self._proc = proc
        self._kill_when = kill_when
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                with self._lock:
                    self.records.append(rec)
                    self._track(rec)
                if rec.get("a") == "ready":
                    self.ready.set()

    def _track(self, rec: dict[str, str]) -> None:
        action = rec.get("a")
        if action in ("assigned", "started"):
            self.in_flight.add(rec["id"])
        elif action in ("completed", "failed"):
            self.in_flight.discard(rec["id"])
            if action == "completed":
                self.completed += 1
        if self._kill_when is not None and not self.killed.is_set() and self._kill_when(self, rec):
            self._proc.send_signal(signal.SIGKILL)
            self.at_kill = (self.completed, len(self.in_flight))
            self.killed.set()

    def join(self) -> list[dict[str, str]]:
        self._thread.join(timeout=10)
        with self._lock:
            return list(self.records)

    def count(self, action: str) -> int:
        with self._lock:
            return sum(1 for r in self.records if r["a"] == action)


def _spawn_coordinator(t: Target, ns: str, schema: str, **opts: Any) -> subprocess.Popen[str]:
    env = {**os.environ, config.DATABASE_URL_VAR: t.database_url,
           config.REDIS_URL_VAR: t.redis_url, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "toolkit._coordinator", "--namespace", ns, "--schema", schema]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)


def _acked_writes_present(sm: StateManager, acks: list[dict[str, str]]) -> dict[str, bool]:
    """Check every acknowledged write against PostgreSQL (none acknowledged is a failure too)."""
    assignments = sm.list_assignments()
    by_job: dict[str, Counter[str]] = defaultdict(Counter)
    for a in assignments:
        by_job[a.job_id][a.worker_id] += 1
    failed: Counter[str] = Counter(a.job_id for a in assignments if a.status == "failed")
    want_assign: dict[str, Counter[str]] = defaultdict(Counter)
    want_fail: Counter[str] = Counter()
    completed, workflows = set(), set()
    for r in acks:
        if r["a"] == "assigned":
            want_assign[r["id"]][r["w"]] += 1
        elif r["a"] == "failed":
            want_fail[r["id"]] += 1
        elif r["a"] == "completed":
            completed.add(r["id"])
        elif r["a"] == "workflow":
            workflows.add(r["id"])
    jobs = {j.id: j for j in sm.list_jobs()}
    return {
        "every acknowledged workflow is there": bool(workflows) and all(
            sm.get_workflow(w) for w in workflows),
        "every acknowledged assignment is there": bool(want_assign) and all(
            by_job[j][w] >= n for j, c in want_assign.items() for w, n in c.items()),
        "every acknowledged failure is recorded": all(failed[j] >= n for j, n in want_fail.items()),
        "every acknowledged completion is there": bool(completed) and all(
            j in jobs and jobs[j].status == "completed" for j in completed),
    }


def coordinator_crash(t: Target, *, workflows: int = 12, jobs_per_workflow: int = 20,
                      workers: int = 4, kill_at: float = 0.5, job_seconds: float = 0.1,
                      heartbeat_ttl: float = 2.0, say: Say = quiet,
                      keep: bool = False) -> ScenarioResult:
    """Kill a busy coordinator with SIGKILL, rebuild a new one, prove nothing was lost.

    1. A coordinator process creates workflows and runs simulated workers on them
       (each job runs ``job_seconds``), printing each acknowledged write.
    2. It is killed with SIGKILL on progress, not on a clock: as soon as ``kill_at``
       (a fraction) of the jobs are acknowledged completed and a worker has just
       started a job, so jobs are in flight whatever the machine's speed.
    3. A new StateManager starts (``init_state_manager`` rebuilds from PostgreSQL);
       every acknowledged write must be there and the tiers must agree.
    4. The dead coordinator's workers stop heart-beating; after ``heartbeat_ttl``
       their jobs are reclaimed, and new workers finish every workflow. Each
       reclaimed job must then be completed exactly once, or failed by its
       attempts rule (``max_attempts`` used up).
    """
    if not 0 < kill_at < 1:
        raise errors.ValidationError("kill_at", kill_at, "must be a fraction between 0 and 1")
    ns, schema = fresh_names("crash")
    total = workflows * jobs_per_workflow
    say(f"1. starting a coordinator process: {workflows} workflows x {jobs_per_workflow} jobs, "
        f"{workers} workers")
    acks, pid = _run_until_killed(t, ns, schema, total, kill_at, say, workflows=workflows,
                                  jobs=jobs_per_workflow, workers=workers,
                                  heartbeat_ttl=heartbeat_ttl, job_seconds=job_seconds)
    done, flying = acks.at_kill
    say(f"2. kill -9 {pid}: the coordinator dies mid-work")
    say(f"   at the kill: {done} of {total} jobs were completed and acknowledged, "
        f"{flying} jobs were in flight on its workers")
    acked = acks.join()
    say("3. a new coordinator starts: init_state_manager() rebuilds from PostgreSQL")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    sm = init_state_manager(t.database_url, t.redis_url, namespace=ns, schema=schema,
                            heartbeat_ttl=heartbeat_ttl)
    timings["recovery (connect + rebuild)"] = time.perf_counter() - started
    checks = {"the coordinator was killed with about half the work acknowledged":
              acks.killed.is_set() and kill_at * total <= done < total,
              "jobs in flight at the kill > 0": flying > 0}
    try:
        return _after_crash(sm, acked, timings, checks, say, heartbeat_ttl, workers,
                            {"finished_at_kill": done, "in_flight_at_kill": flying})
    finally:
        cleanup(sm, t, keep)


def _run_until_killed(t: Target, ns: str, schema: str, total: int, kill_at: float, say: Say,
                      **opts: Any) -> tuple[_Acks, int]:
    """Run a coordinator child until its acks show ``kill_at`` of the work done and a job in flight."""
    def due(acks: _Acks, rec: dict[str, str]) -> bool:
        return rec["a"] == "started" and acks.completed >= kill_at * total and bool(acks.in_flight)

    proc = _spawn_coordinator(t, ns, schema, **opts)
    acks = _Acks(proc, kill_when=due)
    try:
        if not acks.ready.wait(60):
            raise errors.StorageUnavailable("the coordinator process did not start within 60s")
        deadline = time.monotonic() + 300
        while not acks.killed.wait(0.1) and proc.poll() is None and time.monotonic() < deadline:
            pass
    finally:
        if proc.poll() is None and not acks.killed.is_set():
            say("   the coordinator never reached the kill point; killing it anyway")
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    acks.join()
    if proc.stdout is not None:
        proc.stdout.close()
    return acks, proc.pid


def _after_crash(sm: StateManager, acked: list[dict[str, str]], timings: dict[str, float],
                 checks: dict[str, bool], say: Say, ttl: float, workers: int,
                 details: dict[str, Any]) -> ScenarioResult:
    rebuild = sm.last_rebuild
    before = status_counts(sm)
    active = sm.list_assignments(status="active")
    found = {a.job_id for a in active}
    say(f"   rebuilt in {timings['recovery (connect + rebuild)']:.2f}s; it found {len(found)} jobs "
        f"in flight (assigned to or running on the dead coordinator's workers)")
    checks.update(_acked_writes_present(sm, acked))
    checks["memory and Redis agree with PostgreSQL"] = sm.check_consistency().ok
    checks["no job is in two active assignments"] = len(found) == len(active)
    say(f"4. waiting {ttl:.0f}s for the dead workers' heartbeats to expire, then reaping")
    time.sleep(ttl + 0.2)
    reclaimed = {j.id for j in sm.reap_dead_workers()}
    checks["jobs reclaimed > 0"] = bool(reclaimed)
    checks["every job found in flight is reclaimed"] = (
        reclaimed == found and not sm.list_assignments(status="active"))
    say(f"   {len(reclaimed)} jobs reclaimed (back in their queue, or failed when out of attempts); "
        f"new workers finish the work")
    started = time.perf_counter()
    with simulator.Simulator(sm, workers=workers, failure_rate=0.0, job_seconds=0.0,
                             prefix="new-worker") as sim:
        checks["every job reaches a final status"] = sim.run_until_idle(timeout=120)
    timings["drain after recovery"] = time.perf_counter() - started
    once, by_attempts = _reclaimed_outcomes(sm, reclaimed)
    say(f"   of the {len(reclaimed)} reclaimed jobs, {once} completed exactly once and "
        f"{by_attempts} failed by their attempts rule")
    checks["every reclaimed job completes exactly once or is failed by its attempts rule"] = (
        once + by_attempts == len(reclaimed))
    checks["memory and Redis still agree after the drain"] = sm.check_consistency().ok
    details.update({"acknowledged_writes": len(acked), "found_in_flight": len(found),
                    "reclaimed": len(reclaimed), "reclaimed_completed_once": once,
                    "reclaimed_failed_by_attempts": by_attempts, "rebuild": rebuild})
    return ScenarioResult("coordinator crash and rebuild", checks, timings, before,
                          status_counts(sm), details)


def _reclaimed_outcomes(sm: StateManager, job_ids: set[str]) -> tuple[int, int]:
    """How many of ``job_ids`` completed exactly once, and how many failed with attempts used up."""
    completions = Counter(a.job_id for a in sm.list_assignments(status="completed"))
    once = by_attempts = 0
    for job_id in job_ids:
        job = sm.get_job(job_id)
        if job is None:
            continue
        if job.status == "completed" and completions[job_id] == 1:
            once += 1
        elif job.status == "failed" and job.attempts >= job.max_attempts and not completions[job_id]:
            by_attempts += 1
    return once, by_attempts


def commit_then_crash(t: Target, *, say: Say = quiet, keep: bool = False) -> ScenarioResult:
    """A coordinator dies between its PostgreSQL commit and its Redis update.

    A child coordinator is SIGKILLed by a hook right after committing a job
    completion. PostgreSQL has the write; Redis still shows the old state. A
    second coordinator (without a rebuild) finds the disagreement with
    ``check_consistency()`` and fixes it with ``repair()``.
    """
    ns, schema = fresh_names("commitcrash")
    checks: dict[str, bool] = {}
    timings: dict[str, float] = {}
    say("a coordinator runs with a hook that kills it right after committing a completion")
    proc = _spawn_coordinator(t, ns, schema, workflows=2, jobs=5, workers=1,
                              crash_after_commit="job -> completed")
    acks = _Acks(proc)
    proc.wait(timeout=120)
    acked = acks.join()
    if proc.stdout is not None:
        proc.stdout.close()
    checks["the coordinator died by SIGKILL after the commit"] = (
        proc.returncode == -signal.SIGKILL and any(r["a"] == "crashing" for r in acked))
    sm = init_state_manager(t.database_url, t.redis_url, namespace=ns, schema=schema, rebuild=False)
    try:
        before = status_counts(sm)
        report = sm.check_consistency()
        frame = report.to_frame()
        say(f"check_consistency() without a rebuild: {report}")
        checks["the check finds the stale Redis entries"] = not report.ok
        started = time.perf_counter()
        sm.repair()
        timings["repair"] = time.perf_counter() - started
        checks["after repair() every tier agrees"] = sm.check_consistency().ok
        completed = sm.list_jobs(status="completed")
        checks["the committed completion is kept"] = len(completed) == 1
        after = status_counts(sm)
        return ScenarioResult("crash between the PostgreSQL commit and the Redis update", checks,
                              timings, before, after, {"disagreements": frame})
    finally:
        cleanup(sm, t, keep)


