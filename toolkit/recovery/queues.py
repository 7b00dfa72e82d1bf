"""The queues against PostgreSQL: claims left in flight, every queue reconciled, and the
mirror of the paused queues restored.

Queue keys are written only through ``tiers/redis/queue.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from toolkit.handles import Tiers
from toolkit.models import EntityKind as Kind
from toolkit.tiers.postgres import records, store
from toolkit.tiers.redis import queue, schedule
from toolkit.tiers.redis.client import chunks

WHOLE_QUEUE_AT = 1_000
"""Queue reconciliation reads a whole queue back when it checks at least this many
jobs and at least half of the queue, instead of looking the ids up."""


CHECK_CHUNK = 1000
"""Jobs read from PostgreSQL at a time by :func:`settle_jobs`."""


def restore_paused(t: Tiers) -> tuple[int, int]:
    """Make Redis's set of paused queues equal PostgreSQL's table; return (added, removed).

    Run before the queues are reconciled, so a refilled queue is never served
    while its pause is still missing. The set is replaced in one MULTI/EXEC.
    """
    with t.db.begin("read paused queues") as conn:
        wanted = set(records.paused_queues(conn, t.db.schema))
    current = queue.paused(t.redis, t.ns)
    if current == wanted:
        return 0, 0

    def go() -> None:
        pipe = t.redis.redis.pipeline(transaction=True)
        queue.set_paused(t.ns, wanted, pipe=pipe)
        pipe.execute()

    t.redis.call("restore paused queues", go)
    return len(wanted - current), len(current - wanted)


def return_claims(t: Tiers, *, before: float) -> int:
    """End in-flight claims whose lease ends before ``before``; return how many went back.

    A claim's job goes back to its queue when PostgreSQL still calls it queued
    and is forgotten otherwise. Returning the claim of a live coordinator that
    is about to commit is safe: PostgreSQL's status guard lets only one
    assignment win, and the loser drops the stale queue entry.
    """
    claims = queue.expired_claims(t.redis, t.ns, before)
    if not claims:
        return 0
    with t.db.begin("check in-flight jobs") as conn:
        status = store.statuses(conn, Kind.JOB, [c.job_id for c in claims])
    moved = 0
    for c in claims:
        moved += queue.settle(t.redis, t.ns, c, requeue=status.get(c.job_id) == "queued")
    return moved


def drop_not_queued(t: Tiers, filled: Mapping[str, Mapping[str, float]]) -> int:
    """Check the queues the rebuild filled from its snapshot (``filled``: per queue, each
    job's id and score) against PostgreSQL; return how many jobs were taken out.

    A job PostgreSQL no longer calls queued and due, or that is in flight, leaves
    its queue, unless something moved it since the check (``queue.drop_unchanged``:
    a job queued again has a new score). Each queue is checked and corrected in
    turn. Those queues are then right (a job queued since was pushed by its
    writer after its commit), and :func:`reconcile` is told to leave them.
    """
    if not filled:
        return 0
    client, ns = t.redis, t.ns
    inflight = queue.inflight_ids(client, ns)
    removed = 0
    for name, scores in filled.items():
        ids = list(scores)
        whole = len(ids) >= WHOLE_QUEUE_AT
        with t.db.begin("check queued jobs") as conn:
            due = store.due_ids(conn, name, None if whole else ids, datetime.now(UTC))
        gone = [(j, s, j in inflight) for j, s in scores.items() if j not in due or j in inflight]
        removed += queue.drop_unchanged(client, ns, name, gone)
    return removed


def reconcile(t: Tiers, wanted: Mapping[str, Mapping[str, float]],
              later: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
              checked: Collection[str] = ()) -> tuple[int, int]:
    """Make every queue hold exactly the jobs PostgreSQL calls queued; return (added, removed).

    A job found in a queue that the snapshot did not call queued is checked
    again in PostgreSQL before it is removed, so a job another coordinator
    queued after the snapshot is left alone. Jobs in flight are left to the
    janitor. With ``later`` (the jobs scheduled for later, per queue: due time
    and queue score), the jobs due now are in ``wanted``, and each queue's
    due-time set is made to hold exactly ``later`` (:func:`reconcile_schedule`). The
    queues named in ``checked`` are left as they are (see :func:`drop_not_queued`).
    """
    client, ns = t.redis, t.ns
    inflight = queue.inflight_ids(client, ns)
    added = removed = 0
    for name in sorted(set(wanted) | set(later or {}) | queue.queue_names(client, ns)):
        if name in checked:
            continue
        current = dict(queue.members(client, ns, name))
        want = wanted.get(name, {})
        early = (later or {}).get(name, {})
        add = {j: s for j, s in want.items() if current.get(j) != s and j not in inflight}
        extra = [j for j in current if j not in want]
        if extra or add:
            # Read both sets again: another coordinator may have moved them since the snapshot.
            with t.db.begin("reconcile queues") as conn:
                still = _still_queued(conn, name, [*extra, *add], len(want))
            extra = [j for j in extra if j not in still or j in early]
            add = {j: s for j, s in add.items() if j in still}

        if add or extra or name in wanted:
            client.call("reconcile queues",
                        functools.partial(client.send_packed, queue.correct(ns, name, add, extra)))
        added += len(add)
        removed += len(extra)
    if later is not None:
        more, fewer = reconcile_schedule(t, later)
        added, removed = added + more, removed + fewer
    return added, removed


def reconcile_schedule(t: Tiers, later: Mapping[str, Mapping[str, tuple[float, float]]]
                       ) -> tuple[int, int]:
    """Make each queue's due-time set hold exactly the jobs scheduled for later; (added, removed).

    A member the snapshot did not schedule is checked again in PostgreSQL (still
    queued there with ``run_at`` in the future: left alone) before it is removed.
    A due job is removed from the set: the queue reconciliation has put it in its queue.
    """
    client, ns = t.redis, t.ns
    added = removed = 0
    for name in sorted(set(later) | queue.queue_names(client, ns)):
        current = dict(schedule.members(client, ns, name))
        want = later.get(name, {})
        known = schedule.queue_scores(client, ns, [j for j in want if j in current])
        add = {j: v for j, v in want.items()
               if j not in current or abs(current[j] - v[0]) > 1e-3 or known.get(j) != v[1]}
        drop = [j for j in current if j not in want]
        if drop:
            with t.db.begin("reconcile schedule") as conn:
                keep = store.still_scheduled(conn, name, drop, datetime.now(UTC))
            drop = [j for j in drop if j not in keep]

        def go(add: dict[str, tuple[float, float]] = add, drop: list[str] = drop,
               name: str = name) -> None:
            pipe = client.pipeline()
            schedule.correct(ns, name, add, drop, pipe=pipe)
            pipe.execute()

        if add or drop:
            client.call("reconcile schedule", go)
        added += len(add)
        removed += len(drop)
    return added, removed


def _still_queued(conn: sa.Connection, name: str, ids: list[str], expected: int) -> set[str]:
    """Which of ``ids`` PostgreSQL calls queued on ``name`` now.

    When they are most of the queue (``expected`` jobs at the snapshot; all
    of them after Redis was emptied) the whole queue is read, else the ids are looked up.
    """
    if len(ids) >= WHOLE_QUEUE_AT and 2 * len(ids) >= expected:
        return store.queued_ids(conn, name).intersection(ids)
    return store.still_queued(conn, name, ids)


def settle_jobs(t: Tiers, job_ids: Sequence[str]) -> tuple[int, int]:
    """Make the queues agree with PostgreSQL for these jobs only; return (added, removed).

    Safe beside live writers (a fast start beside other coordinators, a running
    coordinator's catch-up): PostgreSQL is read again after every Redis step that could
    race with one of them. A queued job that no queue holds and that is not in flight
    is put in its queue (``ZADD NX``) or its due-time set. Any entry that may be wrong
    (the job's queue, due time or status changed, or it changed since the first read)
    goes through :func:`_recheck`: taken out (only while it has the score seen), PostgreSQL
    read again, and put back when the job is still queued and due there and not in
    flight. A claim racing with this leaves at worst an entry of a job that is not queued,
    which a dequeue drops (its claim is refused by PostgreSQL). Jobs in flight are left
    to the janitor.
    """
    client, ns = t.redis, t.ns
    added = removed = 0
    for chunk in chunks(sorted(set(job_ids)), CHECK_CHUNK):
        with t.db.begin("settle queues") as conn:
            rows = store.get_many(conn, Kind.JOB, chunk)
        inflight = queue.inflight_ids(client, ns)
        now = datetime.now(UTC)
        queued = [r for r in rows if r["status"] == "queued" and r["id"] not in inflight]
        back = [(r["id"], r["queue"], r["priority"], r["enqueue_seq"]) for r in queued
                if not (r["run_at"] and r["run_at"] > now)]
        later = [(r["id"], r["queue"], r["priority"], r["enqueue_seq"], r["run_at"].timestamp())
                 for r in queued if r["run_at"] and r["run_at"] > now]

        def go(back: list[tuple[str, str, int, int]] = back,
               later: list[tuple[str, str, int, int, float]] = later) -> None:
            pipe = client.pipeline()
            queue.push_missing(ns, back, pipe=pipe)
            schedule.add_many(ns, later, pipe=pipe)  # scheduled: its due-time set, not its queue
            pipe.execute()

        if back or later:
            client.call("settle queues", go)
        added += len(back)
        # What was pushed (it may have been claimed or scheduled since), what scheduling took
        # out of its queue (it may be due now), and every entry outside a job's own queue.
        seen = _strays(t, [r for r in rows if r["id"] not in inflight])
        for job_id, name, priority, seq in back:
            seen.setdefault(name, []).append((job_id, queue.score(priority, seq)))
        removed += _recheck(t, seen)
        scheduled: dict[str, list[tuple[str, float]]] = {}
        for job_id, name, priority, seq, _ in later:
            scheduled.setdefault(name, []).append((job_id, queue.score(priority, seq)))
        removed += _recheck(t, scheduled, take=False)
    return added, removed


def _strays(t: Tiers, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[str, float]]]:
    """Each job of ``rows`` found in a queue that is not its own (a queued, due job's own
    queue is its ``queue``; any other job has none), or in its own at another place than
    PostgreSQL's (a priority change Redis missed), with the score it has there."""
    names = sorted(queue.queue_names(t.redis, t.ns))
    now = datetime.now(UTC)
    own = {r["id"]: (r["queue"], queue.score(r["priority"], r["enqueue_seq"])) for r in rows
           if r["status"] == "queued" and not (r["run_at"] and r["run_at"] > now)}
    pairs = [(str(r["id"]), name) for r in rows for name in names]
    found: dict[str, list[tuple[str, float]]] = {}
    for (job_id, name), score in zip(pairs, queue.scores_in(t.redis, t.ns, pairs), strict=True):
        if score is not None and own.get(job_id) != (name, score):
            found.setdefault(name, []).append((job_id, score))
    return found


def _recheck(t: Tiers, seen: Mapping[str, Sequence[tuple[str, float]]], *,
             take: bool = True) -> int:
    """Take each ``(job id, score)`` seen in a queue out of it (only while it still has that
    score), read PostgreSQL, and put back those it calls queued and due on that queue that
    are not in flight; return how many stayed out. A writer that queues one of them again
    after the removal pushes it after it, so nothing queued is left out of its queue.
    ``take=False``: jobs just taken out by scheduling them (one made due since goes back)."""
    removed = 0
    for name, jobs in seen.items():
        if take:
            taken = queue.take_unchanged(t.redis, t.ns, name, list(jobs))
        else:
            taken = [job_id for job_id, _ in jobs]
        if not taken:
            continue
        with t.db.begin("settle queues: check again") as conn:
            rows = [r for r in store.get_many(conn, Kind.JOB, taken)
                    if r["status"] == "queued" and r["queue"] == name]
        inflight = queue.inflight_ids(t.redis, t.ns)
        now = datetime.now(UTC)
        due = [(r["id"], name, r["priority"], r["enqueue_seq"]) for r in rows
               if r["id"] not in inflight and not (r["run_at"] and r["run_at"] > now)]
        if due:
            t.redis.call("settle queues: put back", functools.partial(_push_missing, t, due))
        if take:
            removed += len(taken) - len(due)
    return removed


def _push_missing(t: Tiers, jobs: list[tuple[str, str, int, int]]) -> None:
    pipe = t.redis.pipeline()
    queue.push_missing(t.ns, jobs, pipe=pipe)
    pipe.execute()
