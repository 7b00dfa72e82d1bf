"""The exception tree of toolkit.

Every error a public method raises is one of these::

    ToolkitError
     +-- ConfigurationError      bad or missing settings (URLs, namespace, schema)
     |    +-- SetupError         the servers answered but the setup is wrong: no toolkit
     |                           tables in the schema, unknown database or role, a refused
     |                           password, permission denied (also a StorageUnavailable)
     +-- NotFound (KeyError)     no entity with that id
     +-- InvalidTransition       a status change the transition table forbids
     |    +-- StaleAttempt       a call fenced to an attempt that was reclaimed or superseded
     +-- ValidationError (ValueError)  bad input, refused before any I/O
     |    +-- IdempotencyConflict  an idempotency key already used for a different request
     +-- LockNotOwned            release/extend of a lock this caller does not hold
     +-- StorageUnavailable      PostgreSQL or Redis could not be reached or failed

No redis-py or SQLAlchemy exception leaves a public method: each tier
translates its driver's errors into ``StorageUnavailable`` at one point.
Each class's docstring is its default message.
"""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60


def _short_repr(value: Any) -> str:
    """A bounded repr: never deep, never long, never raises (deep nesting included)."""
    try:
        shown = _REPR.repr(value)
    except (RecursionError, ValueError, TypeError):
        shown = f"<{type(value).__name__}>"
    return shown if len(shown) <= 80 else shown[:77] + "..."


class ToolkitError(Exception):
    """A toolkit error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class ConfigurationError(ToolkitError):
    """The toolkit is not configured correctly."""


class NotFound(ToolkitError, KeyError):
    """No entity with that id."""

    __str__ = Exception.__str__

    def __init__(self, entity: str, entity_id: str) -> None:
        self.entity = entity
        self.entity_id = entity_id
        super().__init__(f"{entity} not found: id={entity_id!r}")


class InvalidTransition(ToolkitError):
    """That status change is not allowed."""

    def __init__(self, entity: str, entity_id: str, current: str, requested: str) -> None:
        self.entity = entity
        self.entity_id = entity_id
        self.current = current
        self.requested = requested
        super().__init__(
            f"{entity} {entity_id!r}: cannot go from status {current!r} to {requested!r}"
        )


class StaleAttempt(InvalidTransition):
    """That attempt of the job is no longer the current one."""

    def __init__(self, entity: str, entity_id: str, field: str, given: object, current: object) -> None:
        ToolkitError.__init__(
            self, f"{entity} {entity_id!r}: {field}={given!r} is stale, the current {field} is {current!r}"
        )
        self.entity = entity
        self.entity_id = entity_id
        self.current = str(current)
        self.requested = str(given)
        self.field = field


class ValidationError(ToolkitError, ValueError):
    """Invalid input."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        shown = _short_repr(value)
        super().__init__(f"invalid {field}={shown}: {reason}")


class IdempotencyConflict(ValidationError):
    """That idempotency key was already used for a different request."""

    def __init__(self, key: str, entity: str, entity_id: str) -> None:
        self.key = key
        self.entity = entity
        self.entity_id = entity_id
        super().__init__("idempotency_key", key,
                         f"already used for a different request, which made {entity} "
                         f"{entity_id!r}; a retry must repeat its request exactly, and a new "
                         "request needs a new key")


class LockNotOwned(ToolkitError):
    """The lock is not held by this owner."""


class StorageUnavailable(ToolkitError):
    """A storage tier (PostgreSQL or Redis) is unavailable."""

    claimed: tuple[str, ...] = ()
    """The jobs a failed claim (``dequeue``, ``dequeue_many``, the fused verbs) had taken from
    Redis, put back in their queue (or left in flight until their lease ends when Redis
    refused). When the failure came after PostgreSQL committed (a ``COMMIT`` whose reply
    was lost), PostgreSQL holds them claimed by the caller's worker:
    ``return_unstarted(worker_id, claimed)`` gives back those it does, and only those."""


class SetupError(ConfigurationError, StorageUnavailable):
    """The servers answered, but the setup is wrong (schema, database, role or privileges)."""

    # Also a StorageUnavailable: the tier cannot be used as configured, and code that
    # degrades on an unavailable tier (a Redis refusal after a PostgreSQL commit never
    # un-does the write) keeps doing so. The CLI exits 4 for it, not 3.
