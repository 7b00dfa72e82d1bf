"""A Hypothesis state machine: the StateManager against a plain-Python model, with faults.

Issue 7, case 11. After every step: the StateManager equals the model, the tiers
agree, no job is in two active assignments, every queued job is in Redis exactly once.
Runs on the private server pair (one rule restarts Redis).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import unique, wipe_namespace
from tests.reliability.conftest import Private, assert_invariants, retry_storage

WORKERS = ("w1", "w2")


@dataclass
class ModelJob:
    workflow: str
    status: str = "queued"
    worker: str | None = None
    attempts: int = 0
    max_attempts: int = 2


@dataclass
class Model:
    jobs: dict[str, ModelJob] = field(default_factory=dict)
    workflows: set[str] = field(default_factory=set)
    active: set[str] = field(default_factory=set)



class StateMachine(RuleBasedStateMachine):
    """Drives one StateManager on a fresh schema/namespace of the private pair."""

    private: Private  # set by the test function

    def __init__(self) -> None:
        super().__init__()
        name = unique("tk_sm")
        p = type(self).private
        self.p = Private(p.stack, p.database_url, p.redis_url, name, name)
        self.sm = self.p.manager(heartbeat_ttl=30.0)
        self.raw = self.p.raw_redis()
        self.model = Model()
        self.counter = 0
        for w in WORKERS:
            self.sm.register_worker(w)
            self.model.active.add(w)

    def teardown(self) -> None:
        self.sm.close()
        self.raw.close()
        wipe_namespace(self.p.redis_url, self.p.namespace)

    # -- helpers ----------------------------------------------------------------------------
    def _with(self, *statuses: str) -> list[str]:
        return sorted(j for j, m in self.model.jobs.items() if m.status in statuses)

    # -- operations -------------------------------------------------------------------------
    @rule(n=st.integers(1, 3))
    def create(self, n: int) -> None:
        self.counter += 1
        wid = f"wf{self.counter}"
        ids = [f"{wid}-j{i}" for i in range(n)]
        self.sm.create_workflow(wid, workflow_id=wid,
                                jobs=[{"name": j, "id": j, "max_attempts": 2} for j in ids])
        self.model.workflows.add(wid)
        for j in ids:
            self.model.jobs[j] = ModelJob(wid)

    @rule(worker=st.sampled_from(WORKERS))
    def dequeue(self, worker: str) -> None:
        if worker not in self.model.active:
            self.sm.register_worker(worker)
            self.model.active.add(worker)
        job = self.sm.dequeue(worker)
        if job is None:
            assert not self._with("queued"), "a queued job could not be dequeued"
            return
        m = self.model.jobs[job.id]
        assert m.status == "queued", (job.id, m)
        m.status, m.worker, m.attempts = "assigned", worker, m.attempts + 1
        assert job.attempts == m.attempts and job.worker_id == worker

    @precondition(lambda self: self._with("assigned"))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        j = data.draw(st.sampled_from(self._with("assigned")))
        self.sm.start_job(j)
        self.model.jobs[j].status = "running"

    @precondition(lambda self: self._with("running"))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        j = data.draw(st.sampled_from(self._with("running")))
        self.sm.complete_job(j, {"ok": True})
        self.model.jobs[j].status = "completed"

    @precondition(lambda self: self._with("assigned", "running"))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        j = data.draw(st.sampled_from(self._with("assigned", "running")))
        self.sm.fail_job(j, "boom", retry=True, retry_in=0)  # the model has no clock: retry now
        m = self.model.jobs[j]
        m.status = "queued" if m.attempts < m.max_attempts else "failed"
        m.worker = None if m.status == "queued" else m.worker

    @precondition(lambda self: self.model.workflows)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(self.model.workflows)))
        self.sm.delete_workflow(wid)
        self.model.workflows.discard(wid)
        self.model.jobs = {j: m for j, m in self.model.jobs.items() if m.workflow != wid}

    @rule(worker=st.sampled_from(WORKERS))
    def heartbeat(self, worker: str) -> None:
        self.sm.heartbeat(worker)
        self.model.active.add(worker)

    @rule()
    def reap(self) -> None:
        assert self.sm.reap_dead_workers() == []  # everyone beat within heartbeat_ttl

    @rule(worker=st.sampled_from(WORKERS))
    def worker_leaves(self, worker: str) -> None:
        self.sm.deregister_worker(worker)
        self.model.active.discard(worker)
        for m in self.model.jobs.values():
            if m.worker == worker and m.status in ("assigned", "running"):
                m.status, m.worker = "queued", None

    # -- faults -----------------------------------------------------------------------------
    @rule()
    def crash_coordinator_and_rebuild(self) -> None:
        self.sm.close()
        self.sm = self.p.manager(heartbeat_ttl=30.0)

    @rule()
    def flush_redis_and_repair(self) -> None:
        wipe_namespace(self.p.redis_url, self.p.namespace)
        self.sm.repair()

    @rule()
    def restart_redis(self) -> None:
        self.p.stack.restart_redis()
        retry_storage(self.sm.repair)

    # -- checks -----------------------------------------------------------------------------
    @invariant()
    def matches_the_model(self) -> None:
        jobs = {j.id: j for j in self.sm.list_jobs()}
        assert set(jobs) == set(self.model.jobs)
        for j, m in self.model.jobs.items():
            got = self.sm.get_job(j)
            assert got is not None and got.status == m.status, (j, got, m)
            assert got.attempts == m.attempts and jobs[j].status == m.status
        assert {w.id for w in self.sm.list_workflows()} == self.model.workflows
        assert_invariants(self.sm, self.raw, self.p.libpq_url)


def _run(private: Private, examples: int, steps: int) -> None:
    StateMachine.private = private
    run_state_machine_as_test(StateMachine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_state_machine_with_faults_matches_model(private: Private) -> None:
    _run(private, examples=10, steps=15)


@pytest.mark.slow
def test_state_machine_with_faults_matches_model_long(private: Private) -> None:
    _run(private, examples=30, steps=30)
