"""Bulk operator actions over a filter, in two steps: plan (no writes), then apply.

:meth:`Bulk.plan` reads the jobs a filter names and the verb may change, and
returns a :class:`ActionPlan`: the jobs as a DataFrame (with the version each one had),
counts by status and queue, and the filter. It writes nothing.

:meth:`Bulk.apply` changes the planned jobs in batches, one transaction each
through the pipeline: each job only while it is still at its planned version (a
job a worker finished meanwhile is skipped and reported, never overwritten).
Each changed job gets an event whose detail names the action id, the actor and
the reason; each action is a row of ``operator_actions`` whose ``applied`` count
is written in the same transaction as each batch, so it is true after a crash.
Applying the same plan again finishes the rest: a job whose event names this
action is recognised as done (and its Redis state brought up to date).

Touches the tiers only through :class:`~toolkit.manager.pipeline.Pipeline`,
``store``, ``lifecycle`` and ``tiers/postgres/bulk.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa

from toolkit import config, errors, models, validate
from toolkit.manager import jobs as job_steps
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.models import JobStatus as JS
from toolkit.tiers.postgres import bulk as pg_bulk
from toolkit.tiers.postgres import lifecycle, store
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
EVENT_OF = {"requeue": "queued", "cancel": "cancelled", "fail": "failed", "delete": "deleted",
            "set_priority": "edited", "move_queue": "edited"}
"""Verb -> the event each changed job gets (its detail names the action)."""
COUNTER_OF = {"cancel": "jobs_cancelled", "fail": "jobs_failed"}
FILTER_KEYS = ("workflow_id", "status", "queue", "name", "worker_id", "error_contains",
               "older_than", "since", "payload")
"""The filters a plan takes (``all=True`` stands for none of them)."""
PROGRESS_FROM = 5_000
"""Planned jobs from which :meth:`Bulk.apply` shows a progress bar by default."""
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
    data = {c: [r[c] for r in rows] for c in FRAME_DTYPES}
    df = pd.DataFrame(data, index=pd.Index([r["id"] for r in rows], dtype="string", name="job_id"))
    df["updated_at"] = pd.to_datetime(df["updated_at"].astype(object), utc=True)
    return df.astype(dict(FRAME_DTYPES))


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


class Bulk:
    """The bulk operator verbs of a StateManager."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def plan(self, verb: str, *, workflow_id: str | None = None, status: str | Sequence[str] | None = None,
             queue: str | None = None, name: str | None = None, worker_id: str | None = None,
             error_contains: str | None = None, older_than: float | None = None,
             since: float | None = None, payload: Any = None, all: bool = False,
             value: Any = None, reason: str | None = None, actor: str | None = None) -> ActionPlan:
        """Plan a bulk action: which jobs it would change. Writes nothing.

        ``verb`` is ``requeue`` (failed jobs, as ``enqueue`` does), ``cancel``,
        ``fail`` (assigned or running jobs; the error is ``reason``), ``delete``
        (finished or failed jobs no live job depends on), ``set_priority`` or
        ``move_queue`` (pending or queued jobs; ``value`` is the new priority or
        queue). The filters combine with AND: ``workflow_id``, ``status`` (one or
        a list), ``queue``, ``name`` (a glob: ``*`` and ``?``; every other
        character, ``%`` and ``_`` included, matches itself), ``worker_id``,
        ``error_contains`` (case-insensitive, literal), ``older_than`` / ``since``
        (seconds since the job last changed), ``payload`` (a JSON object the
        payload contains). No filter means nothing unless ``all=True``; a delete
        always needs one.

        Returns
        -------
        ActionPlan
            ``frame`` (the jobs, with their versions), ``counts`` and the filter;
            pass it to ``apply_action``.

        Raises
        ------
        ValidationError
            A bad verb, filter or value (nothing is read or written).
        """
        return plan_on(self.pipe.db, verb, self.pipe.now(), workflow_id=workflow_id,
                       status=status, queue=queue, name=name, worker_id=worker_id,
                       error_contains=error_contains, older_than=older_than, since=since,
                       payload=payload, all=all, value=value, reason=reason, actor=actor)

    def apply(self, plan: ActionPlan, *, batch: int = 500, progress: bool | None = None) -> ActionResult:
        """Apply a plan in batches of ``batch`` jobs, each job guarded by its planned version.

        A job changed since the plan is skipped and reported (``skipped_ids``),
        never overwritten. Applying the same plan again (after an interruption)
        changes only what is left: jobs this action already changed are counted
        in ``already``. ``progress`` shows a bar (default: from 5,000 jobs).

        Raises
        ------
        ValidationError
            ``plan`` is not an ActionPlan, or a bad ``batch``.
        """
        if not isinstance(plan, ActionPlan):
            raise errors.ValidationError("plan", type(plan).__name__, "must come from plan_action()")
        size = validate.integer("batch", batch, low=1, high=10_000)
        ids = [str(i) for i in plan.frame.index]
        versions = [int(v) for v in plan.frame["version"]]
        queues = dict(zip(ids, plan.frame["queue"].astype(str), strict=True))
        self.pipe.write(f"start {plan.verb}", lambda conn, ch: pg_bulk.start_action(
            conn, _record(plan), self.pipe.now()))
        applied = already = 0
        skipped: list[str] = []
        with _bar(len(ids), plan.verb, progress) as bar:
            for start in range(0, len(ids), size):
                n, done, passed = self._batch(plan, ids[start:start + size],
                                              versions[start:start + size], queues)
                applied, already = applied + n, already + len(done)
                skipped += passed
                bar.update(min(size, len(ids) - start))
        self.pipe.write(f"finish {plan.verb}", lambda conn, ch: _finish(conn, plan.id, self.pipe.now()))
        return ActionResult(plan.id, len(ids), applied, already, len(skipped), tuple(skipped))

    def _batch(self, plan: ActionPlan, ids: list[str], versions: list[int], queues: Mapping[str, str]
               ) -> tuple[int, list[str], list[str]]:
        """One batch in one transaction: changed now, changed by this action before, skipped."""
        out: dict[str, list[str]] = {"changed": [], "done": [], "skipped": []}
        holder: list[Changes] = []

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            holder[:] = [Changes(action=f"resync {plan.verb}")]
            changed = _change(conn, ch, plan, ids, versions, now)
            if ch.deleted:  # a fast start finds a delete only by this note (made before COMMIT)
                self.pipe.note_deleting(ch.deleted)
            for row in changed:
                if plan.verb != "delete" and row["queue"] != queues[row["id"]]:
                    ch.unqueue.append((row["id"], queues[row["id"]]))
            out["changed"] = [r["id"] for r in changed]
            touched = set(out["changed"])
            rest = [i for i in ids if i not in touched]
            done = pg_bulk.changed_by(conn, rest, plan.id) if rest else set()
            out["done"] = [i for i in rest if i in done]
            out["skipped"] = [i for i in rest if i not in done]
            _resync(conn, holder[0], out["done"], queues, plan.id)
            pg_bulk.count_action(conn, plan.id, len(changed), len(out["skipped"]), now)

        self.pipe.write(f"bulk {plan.verb}", tx)
        resync = holder[0]
        if resync.rows or resync.deleted:
            queued = sum(1 for k, r in resync.rows if k == "job" and r["status"] == JS.QUEUED)
            resync.counters["jobs_queued"] -= queued  # not queued again: Redis is only caught up
            with self.pipe.watermark.pending():
                self.pipe.apply(resync)
        return len(out["changed"]), out["done"], out["skipped"]


def _record(plan: ActionPlan) -> dict[str, Any]:
    return {"id": plan.id, "verb": plan.verb, "actor": plan.actor, "reason": plan.reason,
            "value": plan.value, "filter": dict(plan.filter), "planned": len(plan.frame)}


def _finish(conn: sa.Connection, action_id: str, now: datetime) -> None:
    pg_bulk.finish_action(conn, action_id, now)


def _change(conn: sa.Connection, ch: Changes, plan: ActionPlan, ids: list[str], versions: list[int],
            now: datetime) -> list[store.Row]:
    """Change the batch's jobs still at their planned version; log, end, roll up, count."""
    detail = {"action_id": plan.id, "actor": plan.actor, "reason": plan.reason}
    held: dict[str, list[str]] = {}  # a deleted job's assignments, named in its event
    if plan.verb == "delete":
        rows, gone = pg_bulk.delete_batch(conn, ids, versions, VERBS["delete"])
        ch.deleted += [("job", r["id"]) for r in rows] + [("assignment", a) for a, _ in gone]
        ch.unqueue += [(r["id"], r["queue"]) for r in rows]
        for a, job_id in gone:  # so a resumed apply can drop their copies
            held.setdefault(job_id, []).append(a)
    else:
        values = pg_bulk.values_for(plan.verb, plan.value, plan.reason, now)
        rows = pg_bulk.update_batch(conn, ids, versions, VERBS[plan.verb], values)
        ch.add_all("job", rows)
    if plan.verb in ("cancel", "fail") and rows:
        ch.add_all("assignment", lifecycle.end_assignments(
            conn, "cancelled" if plan.verb == "cancel" else "failed", now,
            job_ids=[r["id"] for r in rows]))
    for r in rows:
        extra: dict[str, Any] = {"value": plan.value} if plan.value is not None else {}
        if plan.verb == "delete":
            extra["assignments"] = held.get(r["id"], [])
        ch.event(EVENT_OF[plan.verb], r, now, **detail, **extra)
        if plan.verb == "requeue" and r["attempts"]:
            ch.event("retried", r, now, manual=True, **detail,
                     attempts_left=r["max_attempts"] - r["attempts"])
    if plan.verb in COUNTER_OF:
        ch.counters[COUNTER_OF[plan.verb]] += len(rows)
    for wf in sorted({r["workflow_id"] for r in rows}):
        ch.add("workflow", job_steps.rollup(conn, wf, now))
    return rows


def _resync(conn: sa.Connection, ch: Changes, done: list[str], queues: Mapping[str, str],
            action_id: str) -> None:
    """Bring Redis up to the jobs this action changed in an earlier, interrupted apply."""
    if not done:
        return
    rows = {r["id"]: r for r in store.get_many(conn, "job", done)}
    gone = [i for i in done if i not in rows]
    if gone:
        ch.deleted += [("assignment", a) for a in pg_bulk.deleted_assignments(conn, gone, action_id)]
    for job_id in done:
        row = rows.get(job_id)
        if row is None:
            ch.deleted.append(("job", job_id))
            ch.unqueue.append((job_id, queues[job_id]))
            continue
        ch.add("job", row)
        if row["status"] != JS.QUEUED or row["queue"] != queues[job_id]:
            ch.unqueue.append((job_id, queues[job_id]))


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _bar(total: int, verb: str, progress: bool | None) -> Any:
    """A tqdm bar over ``total`` jobs when asked (or from :data:`PROGRESS_FROM` by default)."""
    show = total >= PROGRESS_FROM if progress is None else bool(progress)
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=verb, unit="job", leave=False)

