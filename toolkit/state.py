"""StateManager: a thin facade over the rooms in ``toolkit/manager/``, one short method per verb.

The write and read paths are in ``manager/pipeline.py``; each verb's behaviour
is in the room it delegates to, whose docstring :func:`_doc` copies here (so
``help(sm.create_workflow)`` shows it). ARCHITECTURE.md follows one call through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from toolkit import compare, config, errors, models, recovery
from toolkit.lock import Lock
from toolkit.manager import (
    counters,
    dispatch,
    jobs,
    pipeline,
    recorded,
    retention,
    workers,
    workflows,
)
from toolkit.tiers.redis import eviction

if TYPE_CHECKING:
    from toolkit.inspection.inspector import Inspector

log = logging.getLogger(__name__)

CLAIM_LEASE = dispatch.CLAIM_LEASE
DELETED = pipeline.DELETED
MEMORY_MAX_AGE = pipeline.MEMORY_MAX_AGE
DEFAULT_HEARTBEAT_TTL = recorded.DEFAULT_HEARTBEAT_TTL

_inspector_factory: Callable[[StateManager], Inspector] | None = None
"""Builds ``sm.inspector``. The package layer (``toolkit/__init__.py``) registers it, so
the write side never imports the read-only inspection kit (see import-rules.toml)."""


def register_inspector_factory(factory: Callable[[StateManager], Inspector]) -> None:
    """Set how ``StateManager.inspector`` is built (called once by ``toolkit/__init__.py``)."""
    global _inspector_factory
    _inspector_factory = factory


F = TypeVar("F", bound=Callable[..., Any])


def _doc(source: Callable[..., Any]) -> Callable[[F], F]:
    """Give a facade method the docstring of the room's method it delegates to."""
    def decorate(method: F) -> F:
        method.__doc__ = source.__doc__
        return method
    return decorate


class StateManager:
    """The coordinator's state over memory, Redis and PostgreSQL.

    Build one with :func:`toolkit.init_state_manager`. Thread-safe: one
    instance may be shared by many threads.
    """

    FENCE_BLOCK = counters.FENCE_BLOCK
    """Fencing tokens reserved in PostgreSQL at a time (one PostgreSQL write per block)."""

    def __init__(self, settings: config.Settings, *, listen: bool = True) -> None:
        self._pipe = pipeline.Pipeline(settings)
        self.ns, self.db, self.redis, self.memory = (
            self._pipe.ns, self._pipe.db, self._pipe.redis, self._pipe.memory)
        self._workflows = workflows.Workflows(self._pipe)
        self._jobs = jobs.Jobs(self._pipe)
        self._workers = workers.Workers(self._pipe)
        self._dispatch = dispatch.Dispatch(self._pipe, self._workers)
        self._counters = counters.Counters(self._pipe)
        self._retention = retention.Retention(self._pipe)
        self._closed = False
        self.last_rebuild: recovery.RebuildReport | None = None
        self.eviction_risk: eviction.EvictionRisk | None = None
        """What Redis said about evicting keys when this manager connected."""
        self._inspector: Inspector | None = None
        self._listener = self._pipe.listener
        if listen:
            self._listener.start()

    # -- lifecycle ----------------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"StateManager(database={config.mask_url(self.settings.database_url)!r}, "
                f"redis={config.mask_url(self.settings.redis_url)!r}, namespace={self.ns!r}, "
                f"schema={self.settings.schema!r})")

    def __enter__(self) -> StateManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Flush heartbeats and metric checkpoints (best effort), then close every connection."""
        if self._closed:
            return
        self._closed = True
        for step in (self._workers.flush_heartbeats, self.checkpoint_metrics):
            try:
                step()
            except errors.StorageUnavailable as exc:
                log.warning("on close: %s", exc, extra={"action": "close"})
        self._listener.stop()
        if self._inspector is not None:
            self._inspector.close()
        self.db.dispose()
        self.redis.close()

    @property
    def inspector(self) -> Inspector:
        """A read-only :class:`~toolkit.Inspector` over this manager's tiers (memory included)."""
        if _inspector_factory is None:  # pragma: no cover - toolkit/__init__ registers it
            raise errors.ConfigurationError("no Inspector factory registered (import toolkit)")
        with self._workers.lock:
            if self._inspector is None:
                self._inspector = _inspector_factory(self)
            return self._inspector

    @property
    def settings(self) -> config.Settings:
        """What this manager runs with (the heartbeat TTL as recorded for its namespace)."""
        return self._pipe.settings

    @property
    def memory_max_age(self) -> float:
        """Seconds a memory entry may answer reads after it was stored (the staleness bound)."""
        return self._pipe.memory_max_age

    @memory_max_age.setter
    def memory_max_age(self, seconds: float) -> None:
        self._pipe.memory_max_age = seconds

    @property
    def claim_lease(self) -> float:
        """Seconds a popped job may stay in flight before it returns to its queue."""
        return self._dispatch.claim_lease

    @claim_lease.setter
    def claim_lease(self, seconds: float) -> None:
        self._dispatch.claim_lease = seconds

    # -- workflows ------------------------------------------------------------------------

    @_doc(workflows.Workflows.create)
    def create_workflow(self, name: str, *, jobs: Sequence[Mapping[str, Any]] = (),
                        metadata: Mapping[str, Any] | None = None,
                        workflow_id: str | None = None) -> models.Workflow:
        return self._workflows.create(name, jobs=jobs, metadata=metadata, workflow_id=workflow_id)

    @_doc(workflows.Workflows.get)
    def get_workflow(self, workflow_id: str) -> models.Workflow | None:
        return self._workflows.get(workflow_id)

    @_doc(workflows.Workflows.find)
    def list_workflows(self, status: str | None = None) -> list[models.Workflow]:
        return self._workflows.find(status)

    @_doc(workflows.Workflows.update_status)
    def update_workflow_status(self, workflow_id: str, status: str) -> models.Workflow:
        return self._workflows.update_status(workflow_id, status)

    @_doc(workflows.Workflows.cancel)
    def cancel_workflow(self, workflow_id: str) -> models.Workflow:
        return self._workflows.cancel(workflow_id)

    @_doc(workflows.Workflows.delete)
    def delete_workflow(self, workflow_id: str) -> None:
        self._workflows.delete(workflow_id)

    # -- jobs -----------------------------------------------------------------------------

    @_doc(jobs.Jobs.create)
    def create_job(self, workflow_id: str, name: str, *, priority: int = 0,
                   queue: str = "default", payload: Any = None, max_attempts: int = 3,
                   depends_on: Sequence[str] = (), job_id: str | None = None) -> models.Job:
        return self._jobs.create(workflow_id, name, priority=priority, queue=queue, payload=payload,
                                 max_attempts=max_attempts, depends_on=depends_on, job_id=job_id)

    @_doc(jobs.Jobs.get)
    def get_job(self, job_id: str) -> models.Job | None:
        return self._jobs.get(job_id)

    @_doc(jobs.Jobs.find)
    def list_jobs(self, *, workflow_id: str | None = None, status: str | None = None,
                  worker_id: str | None = None) -> list[models.Job]:
        return self._jobs.find(workflow_id=workflow_id, status=status, worker_id=worker_id)

    @_doc(jobs.Jobs.update_status)
    def update_job_status(self, job_id: str, status: str, *, result: Any = None,
                          error: str | None = None) -> models.Job:
        return self._jobs.update_status(job_id, status, result=result, error=error)

    @_doc(jobs.Jobs.enqueue)
    def enqueue(self, job_id: str) -> models.Job:
        return self._jobs.enqueue(job_id)

    @_doc(jobs.Jobs.start)
    def start_job(self, job_id: str, *, worker_id: str | None = None,
                  attempt: int | None = None) -> models.Job:
        return self._jobs.start(job_id, worker_id=worker_id, attempt=attempt)

    @_doc(jobs.Jobs.complete)
    def complete_job(self, job_id: str, result: Any = None, *, worker_id: str | None = None,
                     attempt: int | None = None) -> models.Job:
        return self._jobs.complete(job_id, result, worker_id=worker_id, attempt=attempt)

    @_doc(jobs.Jobs.cancel)
    def cancel_job(self, job_id: str) -> models.Job:
        return self._jobs.cancel(job_id)

    @_doc(jobs.Jobs.fail)
    def fail_job(self, job_id: str, error: str, *, retry: bool = True, worker_id: str | None = None,
                 attempt: int | None = None) -> models.Job:
        return self._jobs.fail(job_id, error, retry=retry, worker_id=worker_id, attempt=attempt)

    # -- dispatch -------------------------------------------------------------------------

    @_doc(dispatch.Dispatch.assign_job)
    def assign_job(self, job_id: str, worker_id: str) -> models.JobAssignment:
        return self._dispatch.assign_job(job_id, worker_id)

    @_doc(dispatch.Dispatch.dequeue)
    def dequeue(self, worker_id: str, *, queues: Sequence[str] | None = None,
                timeout: float = 0.0) -> models.Job | None:
        return self._dispatch.dequeue(worker_id, queues=queues, timeout=timeout)

    @_doc(workers.Workers.assignments)
    def list_assignments(self, *, job_id: str | None = None, worker_id: str | None = None,
                         status: str | None = None) -> list[models.JobAssignment]:
        return self._workers.assignments(job_id=job_id, worker_id=worker_id, status=status)

    # -- workers --------------------------------------------------------------------------

    @_doc(workers.Workers.register)
    def register_worker(self, worker_id: str | None = None, *, hostname: str | None = None,
                        queues: Sequence[str] = ("default",), capacity: int = 1,
                        metadata: Mapping[str, Any] | None = None) -> models.Worker:
        return self._workers.register(worker_id, hostname=hostname, queues=queues,
                                      capacity=capacity, metadata=metadata)

    @_doc(workers.Workers.get)
    def get_worker(self, worker_id: str) -> models.Worker | None:
        return self._workers.get(worker_id)

    @_doc(workers.Workers.find)
    def list_workers(self, *, status: str | None = None) -> list[models.Worker]:
        return self._workers.find(status=status)

    def heartbeat(self, worker_id: str) -> None:
        """Record that a worker is alive (a Redis key with TTL ``heartbeat_ttl``).

        PostgreSQL's ``last_heartbeat`` is written in batches at a throttled
        rate. A heartbeat from an inactive worker makes it active again.
        """
        self._workers.heartbeat_many([worker_id])

    @_doc(workers.Workers.heartbeat_many)
    def heartbeat_many(self, worker_ids: Sequence[str]) -> None:
        self._workers.heartbeat_many(worker_ids)

    @_doc(workers.Workers.active)
    def active_workers(self) -> list[str]:
        return self._workers.active()

    @_doc(workers.Workers.inactive)
    def inactive_workers(self) -> list[str]:
        return self._workers.inactive()

    @_doc(workers.Workers.deregister)
    def deregister_worker(self, worker_id: str) -> models.Worker:
        return self._workers.deregister(worker_id)

    @_doc(workers.Workers.reap_dead)
    def reap_dead_workers(self) -> list[models.Job]:
        self._dispatch.janitor(force=True)
        return self._workers.reap_dead()

    # -- locks and metrics ----------------------------------------------------------------

    @_doc(counters.Counters.lock)
    def lock(self, name: str, *, ttl: float = 30.0, blocking_timeout: float | None = None) -> Lock:
        return self._counters.lock(name, ttl=ttl, blocking_timeout=blocking_timeout)

    @_doc(counters.Counters.incr)
    def incr_metric(self, name: str, amount: int = 1, *, at: datetime | None = None) -> int:
        return self._counters.incr(name, amount, at=at)

    @_doc(counters.Counters.incr_many)
    def incr_metrics(self, amounts: Mapping[str, int]) -> dict[str, int]:
        return self._counters.incr_many(amounts)

    @_doc(counters.Counters.get)
    def get_metric(self, name: str) -> int:
        return self._counters.get(name)

    @_doc(counters.Counters.all)
    def metrics(self) -> dict[str, int]:
        return self._counters.all()

    @_doc(counters.Counters.checkpoint)
    def checkpoint_metrics(self) -> None:
        self._counters.checkpoint()

    # -- retention and recovery -----------------------------------------------------------

    @_doc(retention.Retention.purge)
    def purge(self, older_than: float | timedelta, *,
              statuses: Sequence[str] = ("completed", "cancelled"), batch: int = 1000,
              dry_run: bool = False, progress: bool | None = None) -> int:
        return self._retention.purge(older_than, statuses=statuses, batch=batch, dry_run=dry_run,
                                     progress=progress)

    def rebuild(self, *, progress: bool | None = None) -> recovery.RebuildReport:
        """Reload memory from PostgreSQL and make Redis match it (what a new coordinator runs).

        Returns what was loaded and how long it took (also kept in ``last_rebuild``);
        ``progress`` shows a bar (default: for 50,000 live rows or more).
        """
        self.last_rebuild = recovery.rebuild(self._pipe.tiers, progress=progress)
        return self.last_rebuild

    def _rebuild_from_db(self, *, progress: bool | None = None) -> recovery.RebuildReport:
        """The seed's name for :meth:`rebuild`, kept working."""
        return self.rebuild(progress=progress)

    def check_consistency(self) -> compare.ConsistencyReport:
        """Compare memory and Redis with PostgreSQL; one row per disagreement."""
        return compare.check(self._pipe.tiers)

    def repair(self) -> compare.ConsistencyReport:
        """Make memory and Redis agree with PostgreSQL; return what was found and fixed."""
        return recovery.repair(self._pipe.tiers)


from toolkit.manager.startup import SUBSCRIBE_WAIT, init_state_manager  # noqa: E402 (needs StateManager)

__all__ = ["SUBSCRIBE_WAIT", "StateManager", "init_state_manager", "register_inspector_factory"]
