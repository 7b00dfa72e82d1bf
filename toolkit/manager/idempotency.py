"""Idempotency keys: a create retried under its key is carried out once.

A create given ``idempotency_key`` takes the key with the first statement of
its transaction (``records.claim_key``, a row of ``idempotency_keys``, unique in
the schema). When the key is free, the create goes on and the key commits (or
rolls back) with it. When the key is taken, the create writes nothing: if the
request is the same as the one that took the key, the entity that request made
is returned as it is now (a *replay*), else :class:`~toolkit.errors.IdempotencyConflict`.
Two creates racing under one key meet in that first statement: PostgreSQL makes
the second wait for the first's COMMIT, then it finds the key taken.

"The same request" is compared by a hash stored with the key: SHA-256 of the
request as canonical JSON (sorted keys, no spaces), after validation, with the
defaults filled in, job dependencies by the names or ids given, and only the ids
the caller gave (an id drawn for the call is not part of the request). A key
lives as long as its entity: deleting or purging the entity frees it.

A replay writes nothing to PostgreSQL. It fills the Redis cache of what it
returns (versioned, never over a newer entry) and puts back in its queue a job
that PostgreSQL calls queued but no queue holds: when the first reply was lost,
so was the first call's Redis update. Uses the pipeline and ``records``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from toolkit import errors, models, validate
from toolkit.models import EntityKind as Kind
from toolkit.tiers.postgres import records, store

Rows = list[tuple[str, Mapping[str, Any]]]

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)


def key(value: Any) -> str | None:
    """Return a valid idempotency key (1-255 characters, no control characters), or None."""
    return None if value is None else validate.identifier("idempotency_key", value)


def request_hash(request: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a validated request as canonical JSON."""
    return hashlib.sha256(_CANONICAL.encode(request).encode("utf-8")).hexdigest()


def workflow_request(name: str, metadata: Mapping[str, Any], workflow_id: str | None,
                     jobs: Sequence[Mapping[str, Any]], specs: Sequence[Mapping[str, Any]]
                     ) -> dict[str, Any]:
    """A ``create_workflow`` call in normal form: ``jobs`` as given, ``specs`` as validated."""
    names = {s["id"]: s["name"] for s in specs}
    return {
        "create": "workflow", "name": name, "metadata": metadata, "workflow_id": workflow_id,
        "jobs": [{**{k: v for k, v in s.items() if k not in ("id", "run_at")}, "id": given.get("id"),
                  "depends_on": [names[d] for d in s["depends_on"]]}
                 for s, given in zip(specs, jobs, strict=True)],
    }


def job_request(workflow_id: str, spec: Mapping[str, Any], depends_on: Iterable[str],
                job_id: str | None) -> dict[str, Any]:
    """A ``create_job`` call in normal form (``spec`` as validated)."""
    return {"create": "job", "workflow_id": workflow_id,
            **{k: v for k, v in spec.items() if k not in ("id", "depends_on", "run_at")},
            "depends_on": list(depends_on), "id": job_id}


def claim(conn: sa.Connection, taken: str, digest: str, workflow_id: str, job_id: str | None,
          now: datetime) -> Rows | None:
    """Take the key for this create; None when it was free, else the rows to replay.

    Raises
    ------
    IdempotencyConflict
        The key was taken by a different request (the caller's transaction rolls back).
    """
    found = records.claim_key(conn, {"key": taken, "workflow_id": workflow_id, "job_id": job_id,
                                     "request_hash": digest, "created_at": now})
    if found is None:
        return None
    if found["job_id"] is not None:
        entity, entity_id = "job", found["job_id"]
    else:
        entity, entity_id = "workflow", found["workflow_id"]
    if found["request_hash"] != digest:
        raise errors.IdempotencyConflict(taken, entity, entity_id)
    if entity == Kind.JOB:
        return [(Kind.JOB, _require(store.get(conn, Kind.JOB, entity_id), Kind.JOB, entity_id))]
    wf = _require(store.get(conn, Kind.WORKFLOW, entity_id), Kind.WORKFLOW, entity_id)
    return [(Kind.WORKFLOW, wf), *((Kind.JOB, r) for r in store.select_where(conn, Kind.JOB,
                                                                       workflow_id=entity_id))]


def _require(row: Mapping[str, Any] | None, kind: str, entity_id: str) -> Mapping[str, Any]:
    if row is None:  # the key row and its entity go together (foreign keys, cascade)
        raise errors.NotFound(kind, entity_id)
    return row


def replayed(rows: Rows) -> list[models.Entity]:
    """The entities of a replay, built from the rows it read."""
    return [models.from_dict(kind, row) for kind, row in rows]
