"""Metric counters and their checkpoints to PostgreSQL; distributed locks and their fences.

Counters are ``HINCRBY`` totals plus per-interval buckets in Redis, copied to
PostgreSQL (never lowering a value) at most every :data:`CHECKPOINT_EVERY`
seconds of counting and on close, so a Redis loss does not reset them: the
rebuild raises Redis's totals back to their checkpoints.

Locks are Redis locks (``toolkit.lock``) whose fencing tokens are reserved in
PostgreSQL in blocks, so they never go backwards after a Redis loss.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime

from toolkit import errors, models, validate
from toolkit.lock import Lock
from toolkit.manager.pipeline import Pipeline
from toolkit.tiers.postgres import records
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import metrics
from toolkit.tiers.redis.client import Client, chunks

CHECKPOINT_EVERY = 5.0
"""Seconds of counting between two automatic checkpoints."""
FENCE_BLOCK = 1000
"""Fencing tokens reserved in PostgreSQL at a time (one PostgreSQL write per block)."""


def checkpoint(db: Database, client: Client, ns: str) -> None:
    """Copy metric totals and their time buckets from Redis to PostgreSQL."""
    totals = metrics.totals(client, ns)
    if not totals:
        return
    series = metrics.buckets(client, ns, sorted(totals))
    rows = [(name, datetime.fromtimestamp(start, UTC), value)
            for name, buckets in series.items() for start, value in buckets.items()]
    now = models.utcnow()
    with db.begin("checkpoint metrics") as conn:
        records.checkpoint_metrics(conn, totals, now)
        for chunk in chunks(rows, 1000):
            records.checkpoint_buckets(conn, chunk)


class Counters:
    """The counter and lock verbs of a StateManager."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._last_checkpoint = time.monotonic()

    def lock(self, name: str, *, ttl: float = 30.0, blocking_timeout: float | None = None) -> Lock:
        """Return a distributed lock (not yet acquired); use it as a context manager."""
        return Lock(self.pipe.redis, self.pipe.ns, name, ttl=ttl,
                    blocking_timeout=blocking_timeout, reserve=self._reserve_fences)

    def _reserve_fences(self, name: str, seen: int) -> tuple[int, int]:
        with self.pipe.db.begin("reserve fencing tokens") as conn:
            return records.reserve_fences(conn, name, seen, FENCE_BLOCK)

    def incr(self, name: str, amount: int = 1, *, at: datetime | None = None) -> int:
        """Add ``amount`` to a counter (and its time bucket); return the new total.

        Sent once: after a timeout it raises ``StorageUnavailable`` rather than
        risk counting twice.

        Parameters
        ----------
        name
            Counter name: ``[a-z_][a-z0-9_]*``, at most 100 characters (it becomes
            part of a Redis key and of the Prometheus name ``toolkit_<name>_total``).
        amount
            Integer to add, at least 1: a counter never goes down.
        at
            Timezone-aware time whose bucket gets the increment (default: now);
            for importing or backfilling a history.

        Raises
        ------
        ValidationError
            A bad name, an amount below 1 or a naive ``at`` (the field is
            named); nothing is written.
        """
        validate.metric_name("name", name)
        validate.metric_amount("amount", amount)
        if at is not None and (not isinstance(at, datetime) or at.tzinfo is None):
            raise errors.ValidationError("at", at, "must be a timezone-aware datetime")
        when = time.time() if at is None else at.timestamp()
        total = metrics.incr(self.pipe.redis, self.pipe.ns, name, amount, when)
        self._maybe_checkpoint()
        return int(total)

    def incr_many(self, amounts: Mapping[str, int]) -> dict[str, int]:
        """Add to many counters at once (one Lua call per 1,000); return their new totals.

        Like ``incr_metric``, sent once and never re-sent after a timeout, with
        the same rules for names and amounts; one bad item refuses the whole call.

        Raises
        ------
        ValidationError
            A name that is not ``[a-z_][a-z0-9_]*`` (1-100 characters) or an amount
            below 1; nothing is written.
        """
        if not isinstance(amounts, Mapping):
            raise errors.ValidationError("amounts", amounts, "must be a mapping of name to integer")
        for name, amount in amounts.items():
            validate.metric_name("name", name)
            validate.metric_amount("amount", amount)
        totals = metrics.incr_many(self.pipe.redis, self.pipe.ns, amounts, time.time())
        self._maybe_checkpoint()
        return totals

    def get(self, name: str) -> int:
        """Return a counter's total (0 when it was never incremented)."""
        validate.identifier("name", name)
        return metrics.get(self.pipe.redis, self.pipe.ns, name)

    def all(self) -> dict[str, int]:
        """Return every counter's total."""
        return metrics.totals(self.pipe.redis, self.pipe.ns)

    def checkpoint(self) -> None:
        """Copy counters and their time buckets to PostgreSQL (never lowering a value)."""
        checkpoint(self.pipe.db, self.pipe.redis, self.pipe.ns)
        self._last_checkpoint = time.monotonic()

    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self._last_checkpoint > CHECKPOINT_EVERY:
            self.checkpoint()
