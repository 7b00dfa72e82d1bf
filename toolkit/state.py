"""StateManager: a thin facade over the rooms in ``toolkit/manager/``, one line per verb.

The write and read paths are in ``manager/pipeline.py``; each verb is the method of the room
that owns it (:class:`_Verb`), with its signature and docstring (``help(sm.create_workflow)``
shows them); a new verb is one line here. ARCHITECTURE.md follows one call through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from toolkit import compare, config, errors, recovery, validate
from toolkit.manager import (
    batches,
    bulk,
    counters,
    dispatch,
    jobs,
    operations,
    pipeline,
    queues,
    recorded,
    retention,
    workers,
    workflows,
    working,
)
from toolkit.retry_policy import Backoff, RetryPolicy, policy_setting
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


P = ParamSpec("P")
R = TypeVar("R")


class _Verb(Generic[P, R]):
    """A facade verb: ``sm.verb(...)`` is ``sm.<room>.<method>(...)``, same signature and doc.

    The first lookup on an instance stores the room's bound method in the
    instance, so later calls cost what a direct call to the room costs.
    """

    def __init__(self, room: str, method: Callable[Concatenate[Any, P], R]) -> None:
        self.room, self.method, self.__doc__ = room, method, method.__doc__
        self.name = method.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Callable[Concatenate[Any, P], R]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> Callable[P, R]: ...
    def __get__(self, obj: object | None, owner: type) -> Callable[..., R]:
        if obj is None:
            return self.method
        bound: Callable[P, R] = getattr(getattr(obj, self.room), self.method.__name__)
        obj.__dict__[self.name] = bound
        return bound


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
        self._queues = queues.Queues(self._pipe)
        self._batches = batches.Batches(self._pipe, self._workers, self._dispatch)
        self._counters = counters.Counters(self._pipe)
        self._retention = retention.Retention(self._pipe)
        self._operations = operations.Operations(self._pipe)
        self._bulk = bulk.Bulk(self._pipe)
        self._working = working.Working(self._jobs, self._dispatch, self._workers,
                                        self._batches)
        self._closed = False
        self.last_rebuild: recovery.RebuildReport | None = None
        self.eviction_risk: eviction.EvictionRisk | None = None
        """What Redis said about evicting keys when this manager connected."""
        self._inspector: Inspector | None = None
        self._listener = self._pipe.listener
        self.last_fast_start: recovery.FastStartReport | None = None
        """What the fast start checked, when ``init_state_manager(fast_start=True)`` could use one."""
        if listen:
            self._listener.start()
            self._pipe.watermark.start()

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
        self._pipe.watermark.stop()
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
    def orphan_cap(self) -> int:
        """A job whose worker died this many times while holding it is failed for good by
        ``reap_dead_workers`` (error ``orphan cap: ...``, counter ``jobs_orphan_capped``)
        instead of queued again: a poison pill stops there. Default 3."""
        return self._workers.orphan_cap

    @orphan_cap.setter
    def orphan_cap(self, times: int) -> None:
        self._workers.orphan_cap = validate.integer("orphan_cap", times, low=1, high=1_000_000)

    @property
    def claim_lease(self) -> float:
        """Seconds a popped job may stay in flight before it returns to its queue."""
        return self._dispatch.claim_lease

    @claim_lease.setter
    def claim_lease(self, seconds: float) -> None:
        self._dispatch.claim_lease = seconds

    @property
    def retry_policy(self) -> RetryPolicy | Backoff:
        """The default wait before a retry: a ``RetryPolicy`` or a function of the attempt."""
        return self._pipe.retry_policy

    @retry_policy.setter
    def retry_policy(self, policy: RetryPolicy | Mapping[str, float] | Backoff) -> None:
        self._pipe.retry_policy = policy_setting(policy)

    # -- the verbs: each is the room's method (its signature and docstring) --------------

    create_workflow = _Verb("_workflows", workflows.Workflows.create)
    get_workflow = _Verb("_workflows", workflows.Workflows.get)
    list_workflows = _Verb("_workflows", workflows.Workflows.find)
    update_workflow_status = _Verb("_workflows", workflows.Workflows.update_status)
    cancel_workflow = _Verb("_workflows", workflows.Workflows.cancel)
    delete_workflow = _Verb("_workflows", workflows.Workflows.delete)

    create_job = _Verb("_jobs", jobs.Jobs.create)
    get_job = _Verb("_jobs", jobs.Jobs.get)
    list_jobs = _Verb("_jobs", jobs.Jobs.find)
    update_job_status = _Verb("_jobs", jobs.Jobs.update_status)
    enqueue = _Verb("_jobs", jobs.Jobs.enqueue)
    start_job = _Verb("_jobs", jobs.Jobs.start)
    complete_job = _Verb("_jobs", jobs.Jobs.complete)
    cancel_job = _Verb("_jobs", jobs.Jobs.cancel)
    fail_job = _Verb("_jobs", jobs.Jobs.fail)

    assign_job = _Verb("_dispatch", dispatch.Dispatch.assign_job)
    dequeue = _Verb("_batches", batches.Batches.dequeue)
    dequeue_many = _Verb("_batches", batches.Batches.dequeue_many)
    start_jobs = _Verb("_batches", batches.Batches.start_jobs)
    complete_jobs = _Verb("_batches", batches.Batches.complete_jobs)
    fail_jobs = _Verb("_batches", batches.Batches.fail_jobs)
    complete_and_dequeue = _Verb("_batches", batches.Batches.complete_and_dequeue)
    complete_and_dequeue_many = _Verb("_batches", batches.Batches.complete_and_dequeue_many)
    list_assignments = _Verb("_workers", workers.Workers.assignments)
    pause_queue = _Verb("_queues", queues.Queues.pause)
    resume_queue = _Verb("_queues", queues.Queues.resume)

    register_worker = _Verb("_workers", workers.Workers.register)
    get_worker = _Verb("_workers", workers.Workers.get)
    list_workers = _Verb("_workers", workers.Workers.find)
    heartbeat = _Verb("_workers", workers.Workers.heartbeat)
    heartbeat_many = _Verb("_workers", workers.Workers.heartbeat_many)
    active_workers = _Verb("_workers", workers.Workers.active)
    inactive_workers = _Verb("_workers", workers.Workers.inactive)
    deregister_worker = _Verb("_workers", workers.Workers.deregister)
    reap_dead_workers = _Verb("_dispatch", dispatch.Dispatch.reap_dead_workers)
    return_unstarted = _Verb("_dispatch", dispatch.Dispatch.return_unstarted)
    run_worker = _Verb("_working", working.Working.run_worker)

    lock = _Verb("_counters", counters.Counters.lock)
    incr_metric = _Verb("_counters", counters.Counters.incr)
    incr_metrics = _Verb("_counters", counters.Counters.incr_many)
    get_metric = _Verb("_counters", counters.Counters.get)
    metrics = _Verb("_counters", counters.Counters.all)
    checkpoint_metrics = _Verb("_counters", counters.Counters.checkpoint)

    purge = _Verb("_retention", retention.Retention.purge)
    edit_job = _Verb("_operations", operations.Operations.edit_job)
    plan_action = _Verb("_bulk", bulk.Bulk.plan)
    apply_action = _Verb("_bulk", bulk.Bulk.apply)

    # -- recovery -------------------------------------------------------------------------

    def rebuild(self, *, progress: bool | None = None) -> recovery.RebuildReport:
        """Reload memory from PostgreSQL and make Redis match it (what a new coordinator runs).

        Returns what was loaded and how long it took (also kept in ``last_rebuild``);
        ``progress`` shows a bar (default: for 50,000 live rows or more).
        """
        started = time.time()
        self.last_rebuild = recovery.rebuild(self._pipe.tiers, progress=progress)
        self._pipe.watermark.repaired(started)
        return self.last_rebuild

    def _rebuild_from_db(self, *, progress: bool | None = None) -> recovery.RebuildReport:
        """The seed's name for :meth:`rebuild`, kept working."""
        return self.rebuild(progress=progress)

    def check_consistency(self) -> compare.ConsistencyReport:
        """Compare memory and Redis with PostgreSQL; one row per disagreement."""
        return compare.check(self._pipe.tiers)

    def repair(self) -> compare.ConsistencyReport:
        """Make memory and Redis agree with PostgreSQL; return what was found and fixed.

        When the report warns that PostgreSQL crashed under ``synchronous_commit="off"``
        (:data:`toolkit.compare.CRASH_WARNING`: lost commits that no version comparison
        sees may be cached), the full :meth:`rebuild` runs too, PostgreSQL winning."""
        started = time.time()
        report = recovery.repair(self._pipe.tiers)
        if report.postgres_crashed:
            self.rebuild(progress=False)
        self._pipe.watermark.repaired(started)
        return report


from toolkit.manager.startup import SUBSCRIBE_WAIT, init_state_manager  # noqa: E402 (needs StateManager)

__all__ = ["SUBSCRIBE_WAIT", "StateManager", "init_state_manager", "register_inspector_factory"]
