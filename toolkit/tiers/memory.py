"""Tier 1: the per-process memory of a StateManager.

Holds every workflow, every worker, every active assignment and every live job,
plus a bounded LRU of final jobs and ended assignments. Entries are immutable
snapshots, so a read hands out the stored object itself. A put never replaces
a newer version with an older one. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from toolkit import models

FINAL_LRU_SIZE = 10_000
"""How many final jobs and ended assignments memory keeps, most recently used first."""

KINDS = models.ENTITY_KINDS
STAMP_RESOLUTION = 0.05
"""Entries stored within this many seconds share one time stamp (one float object): the
earlier one, so an entry may expire up to this much early, never late."""


class Memory:
    """Versioned in-process maps, one per entity kind."""

    def __init__(self, final_lru_size: int = FINAL_LRU_SIZE) -> None:
        self._lock = threading.RLock()
        self._live: dict[str, dict[str, models.Entity]] = {k: {} for k in KINDS}
        self._final: OrderedDict[tuple[str, str], models.Entity] = OrderedDict()
        self._final_size = final_lru_size
        # When each entry was stored (time.monotonic()), per kind: the age bound of reads.
        # One float per kind and id, the id string shared with the entity; a bulk store
        # shares one float object, so a rebuild adds only the dict slots.
        self._stored_at: dict[str, dict[str, float]] = {k: {} for k in KINDS}
        self._tick = time.monotonic()

    def get(self, kind: str, entity_id: str) -> models.Entity | None:
        """Return the entity, or None."""
        with self._lock:
            found = self._live[kind].get(entity_id)
            if found is None:
                found = self._final.get((kind, entity_id))
                if found is not None:
                    self._final.move_to_end((kind, entity_id))
            return found

    def get_fresh(self, kind: str, entity_id: str, max_age: float) -> models.Entity | None:
        """Return the entity if it was stored at most ``max_age`` seconds ago, else None."""
        with self._lock:
            found = self._live[kind].get(entity_id)
            if found is None:
                found = self._final.get((kind, entity_id))
                if found is None:
                    return None
                self._final.move_to_end((kind, entity_id))
            if time.monotonic() - self._stored_at[kind].get(entity_id, 0.0) > max_age:
                return None
            return found

    def put(self, kind: str, entity: models.Entity) -> bool:
        """Store ``entity`` unless memory holds a newer version; return whether stored."""
        with self._lock:
            current = self.get(kind, entity.id)
            if current is not None and models.entity_version(current) > models.entity_version(entity):
                return False
            self._store(kind, entity)
            return True

    def put_many(self, kind: str, entities: Iterable[models.Entity]) -> None:
        """Store many entities (versioned, like :meth:`put`)."""
        with self._lock:
            for e in entities:
                self.put(kind, e)

    def _store(self, kind: str, entity: models.Entity, now: float | None = None) -> None:
        key = (kind, entity.id)
        self._stored_at[kind][entity.id] = self._stamp() if now is None else now
        if models.is_final(entity):
            self._live[kind].pop(entity.id, None)
            self._final[key] = entity
            self._final.move_to_end(key)
            while len(self._final) > self._final_size:
                (old_kind, old_id), _ = self._final.popitem(last=False)
                self._stored_at[old_kind].pop(old_id, None)
        else:
            self._final.pop(key, None)
            self._live[kind][entity.id] = entity

    def _stamp(self) -> float:
        """Now, as the shared stamp of this :data:`STAMP_RESOLUTION` window."""
        now = time.monotonic()
        if now - self._tick >= STAMP_RESOLUTION:
            self._tick = now
        return self._tick

    def drop(self, kind: str, entity_id: str, *, below_version: int | None = None) -> None:
        """Forget an entity (only if its version is below ``below_version``, when given)."""
        with self._lock:
            current = self.get(kind, entity_id)
            if current is None:
                return
            if below_version is not None and models.entity_version(current) >= below_version:
                return
            self._live[kind].pop(entity_id, None)
            self._final.pop((kind, entity_id), None)
            self._stored_at[kind].pop(entity_id, None)

    def live(self, kind: str) -> list[models.Entity]:
        """Return a list of the live entities of ``kind``."""
        with self._lock:
            return list(self._live[kind].values())

    def all(self, kind: str) -> list[models.Entity]:
        """Return every entity of ``kind`` memory holds, live and final."""
        with self._lock:
            final = [e for (k, _), e in self._final.items() if k == kind]
            return list(self._live[kind].values()) + final

    def replace(self, kind: str, entities: Iterable[models.Entity]) -> None:
        """Replace every entity of ``kind`` (the rebuild)."""
        with self._lock:
            self._live[kind] = {}
            for key in [k for k in self._final if k[0] == kind]:
                del self._final[key]
            now = self._stamp()
            live: dict[str, models.Entity] = {}
            final: list[models.Entity] = []
            for e in entities:  # what _store does, in bulk for the live ones
                if models.is_final(e):
                    final.append(e)
                else:
                    live[e.id] = e
            self._live[kind] = live
            self._stored_at[kind] = dict.fromkeys(live, now)
            for e in final:
                self._store(kind, e, now)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            for k in KINDS:
                self._live[k] = {}
            self._final.clear()
            for k in KINDS:
                self._stored_at[k] = {}

    def counts(self) -> dict[str, int]:
        """Return the number of live entities per kind."""
        with self._lock:
            return {k: len(v) for k, v in self._live.items()}
