"""Entities of the coordinator: frozen dataclasses, status enums, transitions.

Every entity is an immutable snapshot. JSON-like fields (``payload``,
``result``, ``metadata``) are frozen on construction (dicts become
:class:`FrozenDict`, lists become :class:`FrozenList`), so the object a get returns can be
shared with the cache without anyone changing the cache through it.

A job's ``payload`` is stored packed to save memory: a flat dict of scalars is kept as
its values plus one key tuple shared by every payload with the same keys, and each read
of ``job.payload`` builds a new :class:`FrozenDict` equal to it (same keys, same order,
same JSON), so two reads are equal but not the same object.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from toolkit import frozen
from toolkit.frozen import FrozenDict, freeze, pack_fields, thaw
from toolkit.frozen import FrozenList as FrozenList  # re-exported: models is public


def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class WorkflowStatus(enum.StrEnum):
    """Status of a workflow."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobStatus(enum.StrEnum):
    """Status of a job."""

    PENDING = "pending"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WorkerStatus(enum.StrEnum):
    """Status of a worker."""

    ACTIVE = "active"
    INACTIVE = "inactive"


class AssignmentStatus(enum.StrEnum):
    """Status of a job assignment (one attempt of one job on one worker)."""

    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    RECLAIMED = "reclaimed"
    CANCELLED = "cancelled"


class EntityKind(enum.StrEnum):
    """The four kinds of entity every tier keeps (a memory map, a cache key prefix, a table)."""

    WORKFLOW = "workflow"
    JOB = "job"
    WORKER = "worker"
    ASSIGNMENT = "assignment"


ENTITY_KINDS: tuple[EntityKind, ...] = tuple(EntityKind)
"""Every entity kind, in dependency order (a job's workflow before the job)."""


_J = JobStatus
JOB_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    _J.PENDING: frozenset({_J.QUEUED, _J.CANCELLED}),
    _J.QUEUED: frozenset({_J.ASSIGNED, _J.CANCELLED}),
    _J.ASSIGNED: frozenset({_J.RUNNING, _J.QUEUED, _J.FAILED, _J.CANCELLED}),
    _J.RUNNING: frozenset({_J.COMPLETED, _J.FAILED, _J.QUEUED, _J.CANCELLED}),
    _J.FAILED: frozenset({_J.QUEUED}),
    _J.COMPLETED: frozenset(),
    _J.CANCELLED: frozenset(),
}
"""Allowed job status changes: ``JOB_TRANSITIONS[current]`` holds the targets."""

FINAL_JOB_STATUSES = frozenset(s for s, targets in JOB_TRANSITIONS.items() if not targets)
"""Job statuses nothing leaves (completed, cancelled): a final job is never live again."""
LIVE_JOB_STATUSES = frozenset(JobStatus) - FINAL_JOB_STATUSES
"""Every other job status, ``failed`` included. A job failed for good can still be re-queued
by an operator (which resumes its workflow), so it is live: kept in memory, reloaded by every
rebuild, and its time in its last state keeps counting in ``Inspector.timeline``."""
PURGEABLE_JOB_STATUSES = FINAL_JOB_STATUSES | {JobStatus.FAILED}
"""Statuses ``purge`` may remove (failed means failed for good, in a finished workflow)."""
PROGRESSING_JOB_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.RUNNING})
"""Jobs that can still move by themselves (a pending one waits for a dependency)."""

_W = WorkflowStatus
WORKFLOW_TRANSITIONS: Mapping[WorkflowStatus, frozenset[WorkflowStatus]] = {
    _W.PENDING: frozenset({_W.RUNNING, _W.COMPLETED, _W.FAILED, _W.CANCELLED}),
    _W.RUNNING: frozenset({_W.COMPLETED, _W.FAILED, _W.CANCELLED}),
    _W.FAILED: frozenset({_W.RUNNING, _W.COMPLETED, _W.CANCELLED}),
    _W.COMPLETED: frozenset(),
    _W.CANCELLED: frozenset(),
}
"""Allowed workflow status changes (a failed workflow runs again on a retry)."""

FINISHED_WORKFLOW_STATUSES = frozenset(s for s, t in WORKFLOW_TRANSITIONS.items() if not t)
"""Workflow statuses nothing changes again (completed, cancelled): only their jobs are purged."""


def values(statuses: frozenset[enum.StrEnum]) -> list[str]:
    """The plain strings of a status set, sorted (for SQL parameters and messages)."""
    return sorted(s.value for s in statuses)


def job_sources(target: JobStatus) -> frozenset[JobStatus]:
    """Return the statuses a job may be in to move to ``target``."""
    return frozenset(s for s, targets in JOB_TRANSITIONS.items() if target in targets)


def workflow_sources(target: WorkflowStatus) -> frozenset[WorkflowStatus]:
    """Return the statuses a workflow may be in to move to ``target``."""
    return frozenset(s for s, targets in WORKFLOW_TRANSITIONS.items() if target in targets)


class _Entity:
    """Shared helpers of the entity dataclasses."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (JSON values thawed)."""
        return {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True, slots=True)
class Workflow(_Entity):
    """A named group of jobs with a rolled-up status."""

    id: str
    name: str
    status: WorkflowStatus
    metadata: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime
    version: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", WorkflowStatus(self.status))
        object.__setattr__(self, "metadata", freeze(self.metadata or {}))


@dataclasses.dataclass(frozen=True, slots=True)
class Job(_Entity):
    """One unit of work in a workflow."""

    id: str
    workflow_id: str
    name: str
    status: JobStatus
    priority: int
    queue: str
    payload: Any
    result: Any
    error: str | None
    attempts: int
    max_attempts: int
    worker_id: str | None
    depends_on: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    version: int
    run_at: datetime | None = None
    """When a queued job may be handed out (None: as soon as it is queued). A job queued
    with ``run_at`` in the future is *scheduled*: a delayed job, or a retry backing off."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", JobStatus(self.status))
        object.__setattr__(self, "result", freeze(self.result))
        object.__setattr__(self, "depends_on", tuple(self.depends_on or ()))

    @property
    def is_final(self) -> bool:
        """Whether the job can never change again (completed or cancelled)."""
        return self.status in FINAL_JOB_STATUSES


# The payload is frozen (and a small flat dict packed) by its descriptor.
pack_fields(Job, "payload")


@dataclasses.dataclass(frozen=True, slots=True)
class Worker(_Entity):
    """A process that takes jobs from one or more queues."""

    id: str
    hostname: str
    status: WorkerStatus
    queues: tuple[str, ...]
    capacity: int
    metadata: Mapping[str, Any]
    last_heartbeat: datetime | None
    registered_at: datetime
    version: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", WorkerStatus(self.status))
        object.__setattr__(self, "queues", tuple(self.queues))
        object.__setattr__(self, "metadata", freeze(self.metadata or {}))


@dataclasses.dataclass(frozen=True, slots=True)
class JobAssignment(_Entity):
    """One attempt of one job on one worker."""

    id: str
    job_id: str
    worker_id: str
    status: AssignmentStatus
    attempt: int
    assigned_at: datetime
    finished_at: datetime | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", AssignmentStatus(self.status))


Entity = Workflow | Job | Worker | JobAssignment

ENTITY_TYPES: Mapping[str, type[Any]] = {
    "workflow": Workflow,
    "job": Job,
    "worker": Worker,
    "assignment": JobAssignment,
}
"""Entity kind name to its model class (the names used in keys and reports)."""


def entity_version(entity: Entity) -> int:
    """Return an entity's version (an assignment's status order stands in for it)."""
    if isinstance(entity, JobAssignment):
        return 1 if entity.status is AssignmentStatus.ACTIVE else 2
    return entity.version


def is_final(entity: Entity) -> bool:
    """Whether an entity is finished: a final job or an ended assignment (never live again)."""
    if isinstance(entity, Job):
        return entity.is_final
    if isinstance(entity, JobAssignment):
        return entity.status is not AssignmentStatus.ACTIVE
    return False


_FIELDS: Mapping[str, tuple[str, ...]] = {
    kind: tuple(f.name for f in dataclasses.fields(cls)) for kind, cls in ENTITY_TYPES.items()
}


def from_dict(kind: str, data: Mapping[str, Any]) -> Entity:
    """Build an entity of ``kind`` from a mapping of its fields (extra keys ignored)."""
    get = data.get
    return ENTITY_TYPES[kind](*[get(n) for n in _FIELDS[kind]])  # type: ignore[no-any-return]


def field_names(kind: str) -> tuple[str, ...]:
    """Return the field names of an entity kind, in order."""
    return _FIELDS[kind]


def _freeze_json(value: Any) -> Any:
    """:func:`freeze` with a shortcut for a flat dict (the usual result) and scalars."""
    if type(value) is dict:
        if value and frozen.SCALARS.issuperset(map(type, value.values())):
            # Built the way freeze builds it, so the dict has the same size.
            return FrozenDict({k: v for k, v in value.items()})
        return freeze(value)
    if type(value) in frozen.SCALARS:
        return value
    return freeze(value)


def _freeze_mapping(value: Any) -> Any:
    return _freeze_json(value or {})


def _to_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value or ())


def _enum_lookup(enum_type: type[enum.StrEnum]) -> Any:
    members = {m.value: m for m in enum_type}

    def convert(value: Any) -> Any:
        found = members.get(value)
        return found if found is not None else enum_type(value)

    return convert


_STATUS_TYPES: Mapping[type[Any], type[enum.StrEnum]] = {
    Workflow: WorkflowStatus, Job: JobStatus, Worker: WorkerStatus, JobAssignment: AssignmentStatus,
}


def _converters(cls: type[Any]) -> tuple[tuple[int, Any], ...]:
    """``(position, convert)`` of the fields ``__post_init__`` converts, per class."""
    names = [f.name for f in dataclasses.fields(cls)]
    by_name = {
        "status": _enum_lookup(_STATUS_TYPES[cls]),
        "result": _freeze_json, "metadata": _freeze_mapping, "depends_on": _to_tuple,
        "queues": _to_tuple,
    }  # the payload converts in its descriptor's __set__
    return tuple((names.index(n), fn) for n, fn in by_name.items() if n in names)


def _builder(cls: type[Any]) -> Callable[[Sequence[Any]], Any]:
    setters = tuple(getattr(cls, f.name).__set__ for f in dataclasses.fields(cls))
    converts = _converters(cls)

    def build(values: Sequence[Any]) -> Any:
        fields = list(values)
        for position, convert in converts:
            fields[position] = convert(fields[position])
        entity = object.__new__(cls)
        for set_field, value in zip(setters, fields, strict=False):  # extras are ignored
            set_field(entity, value)
        return entity

    return build


_BUILDERS: Mapping[str, Callable[[Sequence[Any]], Entity]] = {
    kind: _builder(cls) for kind, cls in ENTITY_TYPES.items()}


def row_builder(kind: str) -> Callable[[Sequence[Any]], Entity]:
    """Return the fast constructor of ``kind``: ``row_builder(kind)(values)`` is
    ``from_row(kind, values)`` without the look-ups by kind (for loops over many rows)."""
    return _BUILDERS[kind]


def from_row(kind: str, values: Sequence[Any]) -> Entity:
    """Build an entity of ``kind`` from its field values in field order, trusting them.

    The fast constructor of the rebuild, for rows read from our own database
    (they were validated when written): the fields are stored directly, and
    only the conversions ``__post_init__`` makes are made (status enums,
    frozen JSON values, tuples), so the entity equals, with the same types,
    ``from_dict(kind, dict(zip(field_names(kind), values)))``. Values after
    the last field are ignored.

    Parameters
    ----------
    kind
        ``workflow``, ``job``, ``worker`` or ``assignment``.
    values
        The field values in the order of :func:`field_names`, then any extras.

    Returns
    -------
    Entity
        The new entity.

    Raises
    ------
    ValueError
        A status is not one of the kind's statuses.
    """
    return _BUILDERS[kind](values)
