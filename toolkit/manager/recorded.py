"""Settings that change the meaning of state, recorded with the state.

A coordinator's heartbeat TTL decides which workers are dead, and its claim
lease when a popped job returns to its queue. Each StateManager records them in
PostgreSQL (table ``settings``, one row per namespace) when it starts, so an
Inspector or a CLI command in another process judges liveness exactly as the
coordinator does (``inspection/recorded.py`` reads the row, read-only).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

from toolkit.manager.pipeline import Pipeline
from toolkit.tiers.postgres import records

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TTL = 30.0
"""Heartbeat TTL of a manager given none when none is recorded for its namespace."""


def settle(pipe: Pipeline, *, stated: bool, claim_lease: float) -> None:
    """Record this manager's heartbeat TTL and claim lease in PostgreSQL, or adopt them.

    A manager whose caller stated a TTL records it (the last writer wins; a
    different value recorded before is logged as a warning, since two
    coordinators of one namespace should judge liveness alike). A manager
    given no TTL adopts the recorded one, and records the default only when
    none is recorded.
    """
    with pipe.db.begin("record settings") as conn:
        found = None if stated else records.read_settings(conn, pipe.ns)
        if found is not None:
            pipe.settings = dataclasses.replace(pipe.settings,
                                                heartbeat_ttl=float(found["heartbeat_ttl"]))
            return
        row = {"namespace": pipe.ns, "heartbeat_ttl": pipe.settings.heartbeat_ttl,
               "claim_lease": claim_lease, "updated_at": pipe.now(),
               "written_by": f"{socket.gethostname()}:{os.getpid()}"}
        before = records.record_settings(conn, row)
    changed = {k: (before[k], row[k]) for k in ("heartbeat_ttl", "claim_lease")
               if before is not None and before[k] != row[k]}
    if before is not None and changed:
        log.warning("namespace %r: replacing settings recorded by %s at %s: %s; every "
                    "coordinator of a namespace should run with the same settings",
                    pipe.ns, before["written_by"], before["updated_at"].isoformat(),
                    ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()),
                    extra={"action": "record_settings"})
