"""The coordinator settings recorded in PostgreSQL (migration 0004), read by Inspectors.

A coordinator writes its heartbeat TTL per namespace when it starts; an Inspector
in another process reads it here, in a read-only transaction, so it judges
liveness exactly as the coordinator does. Nothing here writes or creates.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import sqlalchemy as sa

from toolkit.tiers.postgres import export
from toolkit.tiers.postgres import tables as t
from toolkit.tiers.postgres.db import Database

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TTL = 30.0
"""The TTL an Inspector uses when no coordinator has recorded one (the StateManager's default)."""
REFRESH_S = 5.0
"""An Inspector re-reads the recorded settings at most this often (a coordinator may restart)."""


@dataclasses.dataclass(frozen=True)
class Recorded:
    """A heartbeat TTL and where it came from (``source`` says it in words)."""

    heartbeat_ttl: float
    source: str


def read(db: Database, namespace: str) -> Recorded:
    """Return the TTL recorded for ``namespace``, or the default and why (never writes)."""
    s = t.settings
    if not export.has_table(db, s.name):
        return _default(f"no settings table in schema {db.schema!r} (a schema from before "
                        "migration 0004: start a coordinator of this version to record them)")
    rows = export.scalar_rows(db, sa.select(s.c.heartbeat_ttl, s.c.written_by, s.c.updated_at)
                              .where(s.c.namespace == namespace))
    if not rows:
        return _default(f"no coordinator has recorded settings for namespace {namespace!r}")
    ttl, by, at = rows[0]
    return Recorded(float(ttl), f"recorded by coordinator {by} at {at.isoformat()}")


def _default(why: str) -> Recorded:
    log.warning("heartbeat TTL: using the default %.1fs: %s", DEFAULT_HEARTBEAT_TTL, why,
                extra={"action": "read_settings"})
    return Recorded(DEFAULT_HEARTBEAT_TTL, f"default {DEFAULT_HEARTBEAT_TTL:.1f}s: {why}")


class Cache:
    """:func:`read`, at most once per :data:`REFRESH_S`."""

    def __init__(self, db: Database, namespace: str) -> None:
        self._db, self._ns = db, namespace
        self._value: Recorded | None = None
        self._at = 0.0

    def get(self) -> Recorded:
        """The recorded settings, re-read when older than :data:`REFRESH_S`."""
        now = time.monotonic()
        if self._value is None or now - self._at > REFRESH_S:
            self._value, self._at = read(self._db, self._ns), now
        return self._value
