"""Planning bulk operator actions: the verbs, the filters, and the plan (no writes).

:func:`plan_on` reads the jobs a filter names and the verb may change, in one
read-only snapshot, and returns an :class:`ActionPlan`: the jobs as a DataFrame
(with the version each one had, the guard of the apply), counts by status and
queue, and the validated filter. A bad verb, filter or value raises
``ValidationError`` before anything is read. :mod:`toolkit.manager.bulk` applies plans.

Touches PostgreSQL only, through ``store`` and ``tiers/postgres/bulk.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd

from toolkit import config, errors, models, validate
from toolkit.models import JobStatus as JS
from toolkit.tiers.postgres import bulk as pg_bulk
from toolkit.tiers.postgres import store
from toolkit.tiers.postgres.db import Database

_WAITING = (JS.PENDING.value, JS.QUEUED.value)
VERBS: Mapping[str, tuple[str, ...]] = {
    "requeue": (JS.FAILED.value,),
    "cancel": tuple(sorted(models.values(models.job_sources(JS.CANCELLED)))),
    "fail": tuple(sorted(models.values(models.job_sources(JS.FAILED)))),
    "delete": tuple(sorted(models.values(models.PURGEABLE_JOB_STATUSES))),
    "set_priority": _WAITING,
    "move_queue": _WAITING,
}
"""Verb -> the statuses of the jobs it may change (the rest are never planned)."""
FILTER_KEYS = ("workflow_id", "status", "queue", "name", "worker_id", "error_contains",
               "older_than", "since", "payload")
"""The filters a plan takes (``all=True`` stands for none of them)."""
FRAME_DTYPES: Mapping[str, Any] = {
    "workflow_id": "string", "name": "string", "status": pd.CategoricalDtype([s.value for s in JS]),
    "queue": "string", "priority": "Int64", "version": "Int64", "attempts": "Int64",
    "worker_id": "string", "error": "string", "updated_at": pd.DatetimeTZDtype(unit="us", tz="UTC"),
}
"""The columns of :attr:`ActionPlan.frame` (index ``job_id``), in order."""


@dataclasses.dataclass(frozen=True)
class ActionPlan:
    """What an action would change: made by ``sm.plan_action``, applied by ``sm.apply_action``.

    ``id`` is the action's id (its row in ``Inspector.actions()`` once applied);
    ``frame`` the jobs it would change (index ``job_id``, with the ``version``
    each job had, the guard of the apply); ``counts`` how many, by status and queue.
    """

    id: str
    verb: str
    filter: Mapping[str, Any]
    value: Any
    actor: str | None
    reason: str | None
    frame: pd.DataFrame
    counts: pd.DataFrame
    created_at: datetime

    def __repr__(self) -> str:
        return (f"ActionPlan({self.verb} {len(self.frame)} job(s), filter={json.dumps(self.filter)}, "
                f"id={self.id!r})")


@dataclasses.dataclass(frozen=True)
class ActionResult:
    """What an apply did: ``applied`` now, ``already`` changed by an earlier apply of the
    same plan, ``skipped`` (changed by someone else since the plan; ids in ``skipped_ids``)."""

    action_id: str
    planned: int
    applied: int
    already: int
    skipped: int
    skipped_ids: tuple[str, ...]


def check_filter(verb: Any, filters: Mapping[str, Any], all_jobs: bool) -> dict[str, Any]:
    """Validate a verb and its filter; return the filter as stored (JSON-able).

    Raises
    ------
    ValidationError
        An unknown verb, a bad filter value, an empty filter without ``all``, or a
        delete without a filter.
    """
    if verb not in VERBS:
        raise errors.ValidationError("verb", verb, f"expected one of {', '.join(VERBS)}")
    out: dict[str, Any] = {}
    for key in ("workflow_id", "queue", "worker_id"):
        if filters.get(key) is not None:
            out[key] = validate.identifier(key, filters[key])
    if filters.get("status") is not None:
        given = [filters["status"]] if isinstance(filters["status"], str) else filters["status"]
        out["status"] = sorted({validate.status("status", s, JS).value for s in given})
    for key in ("name", "error_contains"):
        if filters.get(key) is not None:
            out[key] = validate.text(key, filters[key], max_length=1000)
    for key in ("older_than", "since"):
        if filters.get(key) is not None:
            out[key] = validate.seconds(key, filters[key])
    if filters.get("payload") is not None:
        payload = validate.json_value("payload", filters["payload"])
        if not isinstance(payload, dict) or not payload:
            raise errors.ValidationError("payload", filters["payload"],
                                         "must be a non-empty JSON object to look for in payloads")
        out["payload"] = payload
    if verb == "delete" and not out:
        raise errors.ValidationError("filter", None, "a bulk delete needs a filter (all is refused)")
    if not out and not all_jobs:
        raise errors.ValidationError("filter", None, "an empty filter: give one, or all=True "
                                     "to act on every job the verb may change")
    return out


def check_value(verb: str, value: Any) -> Any:
    """The new priority or queue of ``set_priority`` / ``move_queue`` (None for other verbs)."""
    if verb == "set_priority":
        if value is None:
            raise errors.ValidationError("value", value, "set_priority needs value=<priority>")
        return validate.integer("value", value, low=-validate.PRIORITY_LIMIT, high=validate.PRIORITY_LIMIT)
    if verb == "move_queue":
        if value is None:
            raise errors.ValidationError("value", value, "move_queue needs value=<queue>")
        return validate.identifier("value", value)
    if value is not None:
        raise errors.ValidationError("value", value, f"{verb} takes no value")
    return None


def plan_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The typed frame of planned job rows (index ``job_id``, :data:`FRAME_DTYPES`)."""
    data = {c: pd.array([r[c] for r in rows], dtype=d) for c, d in FRAME_DTYPES.items()}
    return pd.DataFrame(data, index=pd.Index([r["id"] for r in rows], dtype="string", name="job_id"))


def count_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Planned jobs by ``(status, queue)``: one column ``jobs`` (Int64)."""
    counts = frame.groupby(["status", "queue"], observed=True).size()
    out = counts.rename("jobs").astype("Int64").to_frame()
    out.index = out.index.set_names(["status", "queue"])
    return out


def _who(reason: str | None, actor: str | None) -> tuple[str | None, str | None]:
    return (None if reason is None else validate.text("reason", reason, max_length=1000),
            None if actor is None else validate.identifier("actor", actor))


_OPTIONS = frozenset(FILTER_KEYS) | {"all", "value", "reason", "actor"}


def plan_on(db: Database, verb: str, now: datetime, **options: Any) -> ActionPlan:
    """:meth:`Bulk.plan` on a database handle (a read-only one will do: it only reads)."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise errors.ValidationError("filter", unknown, f"unknown option(s); expected {sorted(_OPTIONS)}")
    flt = check_filter(verb, {k: options.get(k) for k in FILTER_KEYS}, bool(options.get("all")))
    val = check_value(verb, options.get("value"))
    why, who = _who(options.get("reason"), options.get("actor"))
    with db.begin(f"plan {verb}") as conn:
        store.begin_snapshot(conn)
        rows = pg_bulk.select_jobs(conn, pg_bulk.where(flt, now), VERBS[verb],
                                   deletable=verb == "delete")
    frame = plan_frame(rows)
    return ActionPlan(validate.new_id(), verb, flt, val, who, why, frame, count_frame(frame), now)


def plan_read_only(settings: config.Settings, verb: str, **options: Any) -> ActionPlan:
    """Plan an action over a read-only connection (``toolkit requeue --dry-run``): no
    StateManager, no migration, no write of any kind."""
    db = Database(settings.database_url, settings.schema, read_only=True, pool_size=1)
    try:
        return plan_on(db, verb, models.utcnow(), **options)
    finally:
        db.dispose()
