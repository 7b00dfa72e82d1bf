"""Recovery: PostgreSQL is the truth, and memory and Redis are brought back to it.

- ``rebuilding``: the rebuild a new coordinator runs (``StateManager.rebuild``).
- ``repairing``: ``repair()``, after ``compare.check`` found disagreements.
- ``queues``: claims left in flight returned, every queue reconciled with PostgreSQL.
- ``fast_start``: a new coordinator's start when Redis survived (only what changed since the
  watermarks is checked).
- ``invalidation``: the listener that keeps memory fresh across processes.

The read-only comparison both sides use is ``toolkit.compare``. Every function
takes the tiers as one :class:`toolkit.handles.Tiers`.
"""

from __future__ import annotations

from toolkit.recovery.fast_start import FastStartReport, fast_start
from toolkit.recovery.invalidation import InvalidationListener
from toolkit.recovery.rebuilding import RebuildReport, rebuild
from toolkit.recovery.repairing import repair

__all__ = ["FastStartReport", "InvalidationListener", "RebuildReport", "fast_start", "rebuild", "repair"]
