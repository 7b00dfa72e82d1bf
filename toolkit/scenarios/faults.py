"""Faults of the servers and of the workers: Redis lost, workers dead, PostgreSQL away, races."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from typing import Any

from toolkit import errors, simulator
from toolkit.scenarios.common import (
    Say,
    ScenarioResult,
    Target,
    quiet,
    retry,
    sandbox,
    status_counts,
    unfinished,
    wait_for,
    wipe_namespace,
)
from toolkit.state import StateManager, init_state_manager


def _lose_redis(t: Target, ns: str, say: Say) -> None:
    """Restart the embedded Redis empty, or wipe only ``ns`` on a shared server."""
    if t.stack is not None:
        say("Redis is restarted empty (kill -9 and a new server on the same port)")
        t.stack.restart_redis()
    else:
        say("this scenario's Redis namespace is wiped (a shared server is never flushed)")
        wipe_namespace(t.redis_url, ns)


def redis_loss(t: Target, *, workflows: int = 6, jobs_per_workflow: int = 20, workers: int = 3,
               say: Say = quiet, keep: bool = False) -> ScenarioResult:
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
        wait_for(lambda: sim.counts["completed"] >= workers, timeout=60)  # busy, on progress
        before = status_counts(sm)
        checks["jobs were still unfinished when Redis was lost"] = unfinished(before) > 0
        _lose_redis(t, sm.ns, say)
        reaped = retry(sm.reap_dead_workers)
        checks["no live worker is reaped while Redis has no heartbeats"] = not reaped
        report = retry(sm.check_consistency)
        checks["the check sees Redis disagreeing with PostgreSQL"] = not report.ok
        started = time.perf_counter()
        retry(sm.repair)
        timings["repair"] = time.perf_counter() - started
        # The workers kept running through the loss and the repair; pause them so
        # the check compares the tiers at rest, not a write caught half-way.
        sim.stop()
        after_repair = retry(sm.check_consistency)
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


def worker_failure(t: Target, *, jobs: int = 12, heartbeat_ttl: float = 1.5,
                   say: Say = quiet, keep: bool = False) -> ScenarioResult:
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


def postgres_unavailable(t: Target, *, say: Say = quiet, keep: bool = False) -> ScenarioResult:
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
        again = retry(lambda: sm.create_workflow("after-outage"))
        checks["the same StateManager writes again"] = again is not None
        checks["tiers agree after the outage"] = sm.check_consistency().ok
        after = status_counts(sm)
    if proxy is not None:
        proxy.stop()
    return ScenarioResult("PostgreSQL unavailable", checks, timings, before, after)


def racing_coordinators(t: Target, *, jobs: int = 200, coordinators: int = 3,
                        say: Say = quiet, keep: bool = False) -> ScenarioResult:
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
