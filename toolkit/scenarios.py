"""Fault scenarios against live servers, shared by the CLI, the notebooks and the tests.

Each scenario function injects a real fault, checks what the design promises,
and returns a :class:`ScenarioResult` with before/after frames, timings and a
verdict. Nothing here is a mock: processes are really killed, servers really
restarted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from toolkit import config, errors, simulator
from toolkit.local_stack import LocalStack
from toolkit.state import StateManager, init_state_manager

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclasses.dataclass
class ScenarioResult:
    """What a scenario did, what it checked, and whether every check held."""

    name: str
    checks: dict[str, bool]
    timings: dict[str, float]
    before: pd.DataFrame
    after: pd.DataFrame
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every check held."""
        return all(self.checks.values())

    @property
    def verdict(self) -> str:
        """``PASS`` or ``FAIL``."""
        return "PASS" if self.ok else "FAIL"

    def checks_frame(self) -> pd.DataFrame:
        """The checks as a two-column frame (``check``, ``ok``)."""
        return pd.DataFrame({"check": list(self.checks), "ok": list(self.checks.values())})

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.verdict}"]
        lines += [f"  [{'ok' if v else 'FAILED'}] {k}" for k, v in self.checks.items()]
        lines += [f"  {k}: {v:.3f}s" for k, v in self.timings.items()]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a scenario runs: URLs, and the embedded stack when there is one."""

    database_url: str
    redis_url: str
    stack: LocalStack | None = None

    def __repr__(self) -> str:
        return (f"Target(database={config.mask_url(self.database_url)!r}, "
                f"redis={config.mask_url(self.redis_url)!r}, embedded={self.stack is not None})")


@contextlib.contextmanager
def target(database_url: str | None = None, redis_url: str | None = None) -> Iterator[Target]:
    """Use the given URLs, else ``DATABASE_URL``/``REDIS_URL``, else start the embedded stack."""
    db = database_url or os.environ.get(config.DATABASE_URL_VAR)
    rd = redis_url or os.environ.get(config.REDIS_URL_VAR)
    if db and rd:
        yield Target(config.resolve_database_url(db), config.resolve_redis_url(rd))
        return
    with LocalStack() as stack:
        yield Target(stack.database_url, stack.redis_url, stack)


def fresh_names(prefix: str = "demo") -> tuple[str, str]:
    """Return a new (namespace, schema) pair so a scenario never touches other data."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    return name, name


def status_counts(sm: StateManager) -> pd.DataFrame:
    """Jobs per status in PostgreSQL, every status present (the frame scenarios compare)."""
    from toolkit.models import JobStatus

    counts = Counter(j.status.value for j in sm.list_jobs())
    return pd.DataFrame({"status": [s.value for s in JobStatus],
                         "jobs": [counts.get(s.value, 0) for s in JobStatus]}).set_index("status")


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
                      heartbeat_ttl: float = 2.0, say: Say = _quiet,
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


def wipe_namespace(redis_url: str, ns: str) -> int:
    """Delete every key of one namespace (SCAN + UNLINK, never FLUSHDB); return how many."""
    import redis

    from toolkit.tiers.redis import keys

    r = redis.Redis.from_url(redis_url)
    try:
        names = list(r.scan_iter(match=keys.namespace_pattern(ns), count=1000))
        for i in range(0, len(names), 1000):
            r.unlink(*names[i:i + 1000])
        return len(names)
    finally:
        r.close()


def drop_schema(database_url: str, schema: str) -> None:
    """Drop one PostgreSQL schema by name (never a database)."""
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            psycopg.sql.Identifier(config.validate_schema(schema))))


def cleanup(sm: StateManager, t: Target, keep: bool = False) -> None:
    """Close ``sm`` and remove its schema and namespace (unless ``keep``); best effort."""
    ns, schema = sm.ns, sm.settings.schema
    sm.close()
    if keep:
        return
    with contextlib.suppress(Exception):
        wipe_namespace(t.redis_url, ns)
    with contextlib.suppress(Exception):
        drop_schema(t.database_url, schema)


# -- more scenarios -------------------------------------------------------------------------

@contextlib.contextmanager
def sandbox(t: Target, prefix: str = "sandbox", *, heartbeat_ttl: float = 2.0,
            keep: bool = False) -> Iterator[StateManager]:
    """A StateManager on a fresh schema and namespace, removed (by name) on exit.

    Parameters
    ----------
    t
        Where to run (see :func:`target`).
    prefix
        Start of the schema and namespace name (a random suffix follows).
    heartbeat_ttl
        The manager's heartbeat TTL (short, so scenarios see reclaims quickly).
    keep
        Leave the schema and namespace in place, for a look afterwards.
    """
    ns, schema = fresh_names(prefix)
    sm = init_state_manager(t.database_url, t.redis_url, namespace=ns, schema=schema,
                            heartbeat_ttl=heartbeat_ttl)
    try:
        yield sm
    finally:
        cleanup(sm, t, keep)


def redis_loss(t: Target, *, workflows: int = 6, jobs_per_workflow: int = 20, workers: int = 3,
               say: Say = _quiet, keep: bool = False) -> ScenarioResult:
    """Lose Redis's data while workers run, and rebuild it from PostgreSQL with ``repair()``.

    On the embedded stack Redis is really restarted empty; on external servers
    only this scenario's namespace is wiped (never the whole server).
    """
    checks: dict[str, bool] = {}
    timings: dict[str, float] = {}
    with sandbox(t, "redisloss", keep=keep) as sm:
        simulator.make_workflows(sm, workflows, jobs_per_workflow, prefix="rl")
        sm.incr_metric("deploys", 3)
        sm.checkpoint_metrics()
        sim = simulator.Simulator(sm, workers=workers, failure_rate=0.0, job_seconds=0.02,
                                  prefix="rl-worker").start()
        _wait_for(lambda: sim.counts["completed"] >= workers, timeout=60)  # busy, on progress
        before = status_counts(sm)
        checks["jobs were still unfinished when Redis was lost"] = _unfinished(before) > 0
        if t.stack is not None:
            say("Redis is restarted empty (kill -9 and a new server on the same port)")
            t.stack.restart_redis()
        else:
            say("this scenario's Redis namespace is wiped (a shared server is never flushed)")
            wipe_namespace(t.redis_url, sm.ns)
        reaped = _retry(sm.reap_dead_workers)
        checks["no live worker is reaped while Redis has no heartbeats"] = not reaped
        report = _retry(sm.check_consistency)
        checks["the check sees Redis disagreeing with PostgreSQL"] = not report.ok
        started = time.perf_counter()
        _retry(sm.repair)
        timings["repair"] = time.perf_counter() - started
        # The workers kept running through the loss and the repair; pause them so
        # the check compares the tiers at rest, not a write caught half-way.
        sim.stop()
        after_repair = _retry(sm.check_consistency)
        checks["after repair() every tier agrees"] = after_repair.ok
        checks["counters come back from their checkpoint"] = sm.get_metric("deploys") >= 3
        sim = simulator.Simulator(sm, workers=workers, failure_rate=0.0, job_seconds=0.0,
                                  prefix="rl-worker").start()
        checks["the workers finish every job"] = sim.run_until_idle(timeout=120)
        sim.stop()
        after = status_counts(sm)
        checks["every job completed"] = len(sm.list_jobs(status="completed")) == (
            workflows * jobs_per_workflow)
        checks["tiers agree at the end"] = sm.check_consistency().ok
        return ScenarioResult("Redis lost and rebuilt from PostgreSQL", checks, timings, before,
                              after, {"disagreements_found": len(report),
                                      "left_after_repair": after_repair.to_frame()})


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _unfinished(counts: pd.DataFrame) -> int:
    """Jobs not in a final status in a :func:`status_counts` frame."""
    final = {"completed", "failed", "cancelled"}
    return int(counts.loc[[s for s in counts.index if s not in final], "jobs"].sum())


def _retry(fn: Callable[[], Any], attempts: int = 5) -> Any:
    """Call ``fn``, retrying briefly while pooled connections notice a restarted server."""
    for i in range(attempts):
        try:
            return fn()
        except errors.StorageUnavailable:
            if i == attempts - 1:
                raise
            time.sleep(0.2)
    return None


def worker_failure(t: Target, *, jobs: int = 12, heartbeat_ttl: float = 1.5,
                   say: Say = _quiet, keep: bool = False) -> ScenarioResult:
    """A worker dies holding a job; its heartbeat expires; the job is reclaimed and finished."""
    checks: dict[str, bool] = {}
    timings: dict[str, float] = {}
    with sandbox(t, "workerfail", heartbeat_ttl=heartbeat_ttl, keep=keep) as sm:
        wf = sm.create_workflow("reclaim-demo", jobs=[{"name": f"job-{i:02d}", "priority": 9 if i == 0 else 0}
                                                      for i in range(jobs)])
        sm.register_worker("doomed")  # its first and last heartbeat
        last_beat = time.perf_counter()
        victim = sm.dequeue("doomed")
        assert victim is not None
        sm.start_job(victim.id)
        say(f"worker 'doomed' took {victim.name} and died (no more heartbeats)")
        before = status_counts(sm)
        sim = simulator.Simulator(sm, workers=2, failure_rate=0.0, job_seconds=0.01,
                                  prefix="healthy").start()
        reclaimed: list[Any] = []
        while not reclaimed and time.perf_counter() - last_beat < heartbeat_ttl * 5:
            time.sleep(0.1)
            reclaimed = sm.reap_dead_workers()
        timings["death to reclaim"] = time.perf_counter() - last_beat
        say(f"after {timings['death to reclaim']:.1f}s the reaper reclaimed "
            f"{[j.name for j in reclaimed]}")
        checks["the dead worker's job is reclaimed"] = [j.id for j in reclaimed] == [victim.id]
        checks["it is not reclaimed before the TTL"] = timings["death to reclaim"] >= heartbeat_ttl
        checks["the dead worker is inactive"] = sm.get_worker("doomed").status == "inactive"  # type: ignore[union-attr]
        checks["the healthy workers stay active"] = all(
            sm.get_worker(w).status == "active" for w in sim.worker_ids)  # type: ignore[union-attr]
        checks["every job is finished"] = sim.run_until_idle(timeout=60)
        sim.stop()
        history = sm.inspector.assignments(job_id=victim.id)
        checks["the attempt history shows reclaimed then completed"] = list(history["status"]) == [
            "reclaimed", "completed"]
        checks["the workflow completes"] = sm.get_workflow(wf.id).status == "completed"  # type: ignore[union-attr]
        after = status_counts(sm)
        return ScenarioResult("worker failure and reclaim", checks, timings, before, after,
                              {"victim": victim.name, "history": history})


def commit_then_crash(t: Target, *, say: Say = _quiet, keep: bool = False) -> ScenarioResult:
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


def postgres_unavailable(t: Target, *, say: Say = _quiet, keep: bool = False) -> ScenarioResult:
    """PostgreSQL goes away: writes fail loudly, cached reads keep serving, then it returns.

    On the embedded stack PostgreSQL is really stopped; on external servers the
    scenario talks to PostgreSQL through a TCP proxy it owns and cuts that.
    """
    from toolkit.faults import TcpProxy

    checks: dict[str, bool] = {}
    timings: dict[str, float] = {}
    proxy = None if t.stack is not None else TcpProxy.to_url(t.database_url).start()
    url = t.database_url if proxy is None else proxy.url_for(t.database_url)
    with sandbox(Target(url, t.redis_url, t.stack), "pgdown", keep=keep) as sm:
        wf = sm.create_workflow("pg-outage", jobs=[{"name": f"j{i}"} for i in range(5)])
        job = sm.list_jobs(workflow_id=wf.id)[0]
        sm.get_job(job.id)
        before = status_counts(sm)
        say("PostgreSQL goes away")
        (t.stack.stop_postgres if t.stack is not None else proxy.cut)()  # type: ignore[union-attr]
        try:
            started = time.perf_counter()
            try:
                sm.create_workflow("during-outage")
                failed_loudly = False
            except errors.StorageUnavailable as exc:
                failed_loudly = True
                say(f"a write fails loudly: {exc}")
            timings["failed write"] = time.perf_counter() - started
            checks["writes fail with StorageUnavailable"] = failed_loudly
            checks["they fail within 10 seconds"] = timings["failed write"] < 10
            cached = sm.get_job(job.id)
            checks["cached reads keep answering"] = cached is not None and cached.id == job.id
            checks["the failed write left nothing in memory"] = not any(
                w.name == "during-outage" for w in sm.memory.live("workflow"))  # type: ignore[union-attr]
        finally:
            say("PostgreSQL comes back")
            (t.stack.start_postgres if t.stack is not None else proxy.restore)()  # type: ignore[union-attr]
        again = _retry(lambda: sm.create_workflow("after-outage"))
        checks["the same StateManager writes again"] = again is not None
        checks["tiers agree after the outage"] = sm.check_consistency().ok
        after = status_counts(sm)
    if proxy is not None:
        proxy.stop()
    return ScenarioResult("PostgreSQL unavailable", checks, timings, before, after)


def racing_coordinators(t: Target, *, jobs: int = 200, coordinators: int = 3,
                        say: Say = _quiet, keep: bool = False) -> ScenarioResult:
    """Several coordinators drain the same queue at once: no job is ever assigned twice."""
    checks: dict[str, bool] = {}
    timings: dict[str, float] = {}
    with sandbox(t, "race", keep=keep) as sm:
        sm.create_workflow("race", jobs=[{"name": f"j{i:04d}", "priority": i % 4} for i in range(jobs)])
        others = [init_state_manager(t.database_url, t.redis_url, namespace=sm.ns,
                                     schema=sm.settings.schema, heartbeat_ttl=2.0)
                  for _ in range(coordinators - 1)]
        before = status_counts(sm)
        got: dict[str, list[str]] = defaultdict(list)
        lock = threading.Lock()

        def drain(m: StateManager, wid: str) -> None:
            m.register_worker(wid, capacity=jobs)
            while (job := m.dequeue(wid)) is not None:
                with lock:
                    got[job.id].append(wid)

        started = time.perf_counter()
        threads = [threading.Thread(target=drain, args=(m, f"coordinator-{i}"))
                   for i, m in enumerate([sm, *others])]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        timings["drain"] = time.perf_counter() - started
        say(f"{len(got)} jobs taken by {coordinators} coordinators in {timings['drain']:.2f}s")
        checks["every job was taken"] = len(got) == jobs
        checks["no job was taken twice"] = all(len(v) == 1 for v in got.values())
        active = sm.list_assignments(status="active")
        checks["one active assignment per job"] = len(active) == jobs == len({a.job_id for a in active})
        checks["tiers agree"] = sm.check_consistency().ok
        per = Counter(w for v in got.values() for w in v)
        after = status_counts(sm)
        for m in others:
            m.close()
        return ScenarioResult("coordinators racing for one queue", checks, timings, before, after,
                              {"jobs_per_coordinator": dict(per)})
