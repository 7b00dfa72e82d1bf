"""What an Inspector points at: is it a toolkit schema, does it hold anything? Reads only.

A typo in ``--schema`` or ``--namespace`` during an incident must neither create
anything nor look like an outage (every worker dead, every queue empty): the
schema without toolkit tables is a :class:`~toolkit.errors.SetupError`, and an
empty namespace or schema is said in plain words.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa

from toolkit import errors, models, validate
from toolkit.tiers.postgres import records, store
from toolkit.tiers.postgres import tables as t
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import keys
from toolkit.tiers.redis.client import Client

log = logging.getLogger(__name__)

SCAN_CALLS = 100
"""At most this many SCAN calls (1000 keys each) look for a key of an empty-looking namespace."""
PURGEABLE = tuple(models.values(models.PURGEABLE_JOB_STATUSES))


def require_tables(db: Database) -> None:
    """Raise :class:`~toolkit.errors.SetupError` when ``db.schema`` has no toolkit tables."""
    with db.begin("look for the toolkit's tables") as conn:
        found = store.has_toolkit_tables(conn, db.schema)
    if not found:
        raise errors.SetupError(
            f"schema {db.schema!r} has no toolkit tables: check --schema/--database-url "
            "(nothing was created; init_state_manager creates them)")


def _namespace_has_keys(client: Client, ns: str) -> bool:
    known = (keys.boot(ns), keys.queues(ns), keys.heartbeats(ns), keys.metrics(ns), keys.inflight(ns))
    if client.call("look for the namespace's keys", lambda: client.redis.exists(*known)):
        return True
    cursor = 0
    for _ in range(SCAN_CALLS):
        def scan(at: int = cursor) -> tuple[int, list[str]]:
            reply: tuple[int, list[str]] = client.redis.scan(at, match=keys.namespace_pattern(ns),
                                                             count=1000)
            return reply

        cursor, found = client.call("look for the namespace's keys", scan)
        if found:
            return True
        if not cursor:
            return False
    return True  # not seen in the budget: say nothing rather than something false


def _schema_has_rows(db: Database) -> bool:
    with db.begin("look for rows") as conn:
        return any(conn.execute(sa.select(sa.exists().select_from(table))).scalar_one()
                   for table in (t.workflows, t.jobs, t.workers))


def notes(db: Database, client: Client, ns: str) -> list[str]:
    """Plain-words notes about an empty namespace or schema (empty list: both hold data).

    An unreachable Redis is only logged: the PostgreSQL frames can still be read,
    and a Redis frame reports the outage itself.
    """
    out = []
    try:
        if not _namespace_has_keys(client, ns):
            out.append(f"namespace {ns!r} holds no keys in Redis: check --namespace (workers show "
                       "alive=False and queues empty because nothing is there, not because of an "
                       "outage)")
    except errors.SetupError:
        raise
    except errors.StorageUnavailable as exc:  # the PostgreSQL frames can still be read
        log.info("namespace %r not checked: %s", ns, exc, extra={"action": "check_target"})
    if not _schema_has_rows(db):
        out.append(f"schema {db.schema!r} holds no workflows, jobs or workers: check --schema")
    return out


def purgeable(db: Database, older_than: float, statuses: list[str], now: datetime) -> int:
    """How many jobs ``StateManager.purge`` would remove now (same validation, same count)."""
    age = validate.seconds("older_than", older_than, allow_zero=True)
    chosen = [validate.status("statuses", s, models.JobStatus).value
              for s in validate.names("statuses", statuses)]
    if not chosen or not set(chosen) <= set(PURGEABLE):
        raise errors.ValidationError("statuses", statuses, f"must be some of {sorted(PURGEABLE)}")
    with db.begin("purge: count") as conn:
        return records.purgeable(conn, chosen, now - timedelta(seconds=age))
