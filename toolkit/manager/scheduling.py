"""Time in the job model: promotion of due jobs, and the wait before a retry.

``Promoter`` moves a manager's due scheduled jobs into their queues before a
claim (at most every :data:`PROMOTE_EVERY` seconds per set of queues, so a
scheduled job is handed out at most about that long after it is due, and a busy
``dequeue`` pays one script call per interval, not per call). ``retry_at`` is
when a failed job runs again: ``retry_in`` when the caller names it, else the
job's own policy, else the manager's default (checked: a backoff that answers
nonsense raises ``ValidationError`` and the failure writes nothing).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from toolkit import retry_policy, validate
from toolkit.handles import Tiers
from toolkit.tiers.postgres import lifecycle
from toolkit.tiers.redis import schedule

PROMOTE_EVERY = 0.1
"""Seconds between two promotions of the same queues by one manager."""


class Promoter:
    """Promotes due jobs of the queues a manager dequeues from, rate-limited."""

    def __init__(self, tiers: Tiers) -> None:
        self.tiers = tiers
        self._last: dict[tuple[str, ...], float] = {}

    def run(self, queue_names: Sequence[str]) -> int:
        """Move the due jobs of ``queue_names`` into their queues (unless done just now)."""
        now = time.time()
        key = tuple(queue_names)
        if now - self._last.get(key, 0.0) < PROMOTE_EVERY:
            return 0
        self._last[key] = now
        return schedule.promote(self.tiers.redis, self.tiers.ns, queue_names, now)


def retry_in_seconds(value: Any) -> float | None:
    """Check ``fail_job``'s ``retry_in``: None, or seconds in ``[0, MAX_DELAY]``."""
    return None if value is None else retry_policy.checked_delay("retry_in", value)


def retry_at(row: Mapping[str, Any], default: retry_policy.RetryPolicy | retry_policy.Backoff,
             retry_in: float | None, now: datetime) -> datetime:
    """When the failed attempt ``row["attempts"]`` runs again (``ValidationError`` for nonsense)."""
    if retry_in is None:
        own = row.get("retry_policy")
        policy = retry_policy.RetryPolicy.from_value("retry_policy", own) if own else default
        retry_in = retry_policy.backoff_of(policy, int(row["attempts"] or 1),
                                           random.uniform(-1.0, 1.0))
    return now + timedelta(seconds=retry_in)


def when(run_at: Any, delay: Any, now: datetime) -> datetime | None:
    """``run_at``/``delay`` of ``create_job`` or ``enqueue``, checked (see :func:`validate.run_at`)."""
    return validate.run_at(run_at, delay, now)


def retry_detail(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """What a ``retried`` event says of the wait: ``backoff_s`` and ``run_at`` (ISO 8601)."""
    at = row.get("run_at")
    if at is None:
        return {}
    return {"backoff_s": round((at - now).total_seconds(), 6), "run_at": at.isoformat()}


def back_off(conn: sa.Connection, rows: Sequence[Mapping[str, Any]],
             default: retry_policy.RetryPolicy | retry_policy.Backoff, now: datetime,
             retry_in: float | None = None) -> list[Mapping[str, Any]]:
    """Schedule the retries of a batched failure: each re-queued row gets its ``run_at``
    (``retry_in`` when given, else its own policy, else ``default``) in PostgreSQL (one
    statement); return the rows with it."""
    due: dict[str, datetime] = {}
    out: list[Mapping[str, Any]] = []
    for row in rows:
        if row["status"] == "queued":
            due[row["id"]] = retry_at(row, default, retry_in, now)
            row = {**row, "run_at": due[row["id"]]}
        out.append(row)
    lifecycle.set_run_at(conn, due)
    return out
