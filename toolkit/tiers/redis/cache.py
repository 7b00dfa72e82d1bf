"""The versioned entity cache: ``{ns}:<kind>:<id>`` -> ``"<version>|<json>"``.

A fill never overwrites a newer version (``set_if_newer.lua``), which closes
the stale-set race of cache-aside. A value that does not decode (corrupt, or
written by something else) is a miss, never executed: values are JSON only.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import orjson

from toolkit import models
from toolkit.tiers.redis import keys
from toolkit.tiers.redis.client import Client, chunks, run_script

log = logging.getLogger(__name__)

FINAL_TTL_MS = 24 * 3600 * 1000
"""Cached final jobs and ended assignments expire after a day; live ones never."""

_DATETIME_FIELDS = frozenset(
    {"created_at", "updated_at", "started_at", "finished_at", "last_heartbeat",
     "registered_at", "assigned_at", "run_at"}
)


BATCH = 200
"""Entities per ``set_many_if_newer`` call."""


_KINDS: dict[type[Any], str] = {cls: kind for kind, cls in models.ENTITY_TYPES.items()}


def kind_of(entity: models.Entity) -> str:
    """Return the key kind (``workflow``, ``job``, ...) of an entity (one dict lookup: this
    runs several times per entity on every write)."""
    return _KINDS[type(entity)]


_GETTERS: dict[type[Any], tuple[tuple[str, ...], Callable[[Any], tuple[Any, ...]]]] = {
    cls: (models.field_names(kind), operator.attrgetter(*models.field_names(kind)))
    for kind, cls in models.ENTITY_TYPES.items()
}
"""Per entity class: its field names and one getter of all their values, in order."""


def encode(entity: models.Entity) -> bytes:
    """Return the cache value of an entity: ``b"<version>|<json>"`` (orjson: datetimes as RFC 3339).

    The fields are read with ``getattr`` (not by handing orjson the dataclass, which
    reads slots directly and would see a job's packed payload, see ``models``).
    """
    names, values = _GETTERS[type(entity)]
    fields = dict(zip(names, values(entity), strict=True))
    return b"%d|%s" % (models.entity_version(entity), orjson.dumps(fields))


def row_encoder(kind: str) -> Callable[[Sequence[Any]], bytes]:
    """Return the encoder of ``kind``'s rows: ``row_encoder(kind)(values)`` is
    ``encode(models.from_row(kind, values))``, without the entity (the rebuild's fill).

    ``values`` are the fields in field order, as the database gives them (values
    after the fields are ignored). JSON makes no difference between what the
    entity holds and the row's values: a status enum and its text, a tuple and
    a list, a frozen dict and a dict encode alike.
    """
    names = models.field_names(kind)
    dumps = orjson.dumps
    if kind == models.EntityKind.ASSIGNMENT:  # versioned by status, as entity_version does
        i_status = names.index("status")

        def encode_assignment(values: Sequence[Any]) -> bytes:
            version = 1 if values[i_status] == models.AssignmentStatus.ACTIVE else 2
            return b"%d|%s" % (version, dumps(dict(zip(names, values, strict=False))))

        return encode_assignment
    i_version = names.index("version")

    def encode_row(values: Sequence[Any]) -> bytes:
        return b"%d|%s" % (values[i_version], dumps(dict(zip(names, values, strict=False))))

    return encode_row


def decode(kind: str, raw: str | None) -> models.Entity | None:
    """Return the entity in a cache value, or None for a miss or a corrupt value."""
    if raw is None:
        return None
    try:
        _, sep, body = raw.partition("|")
        data = orjson.loads(body) if sep else None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for name in _DATETIME_FIELDS.intersection(data):
            if data[name] is not None:
                data[name] = datetime.fromisoformat(data[name])
        return models.from_dict(kind, data)
    except (ValueError, TypeError, KeyError, orjson.JSONDecodeError) as exc:
        log.warning("ignoring a corrupt cache value of a %s: %s", kind, exc,
                    extra={"action": "cache_decode"})
        return None


def version_of(raw: str | None) -> int | None:
    """Return the version prefix of a cache value, or None when absent or corrupt."""
    if raw is None:
        return None
    head = raw.partition("|")[0]
    try:
        return int(head)
    except ValueError:
        return None


def _ttl_ms(entity: models.Entity) -> int:
    if isinstance(entity, models.Job) and entity.is_final:
        return FINAL_TTL_MS
    if isinstance(entity, models.JobAssignment) and entity.status != "active":
        return FINAL_TTL_MS
    return 0


def put(client: Client, ns: str, entities: Iterable[models.Entity], *, pipe: Any) -> None:
    """Queue versioned fills of ``entities`` on ``pipe`` (never overwriting newer).

    One ``set_many_if_newer`` call per :data:`BATCH` entities.
    """
    names: list[str] = []
    args: list[Any] = []
    for e in entities:
        names.append(keys.entity(ns, kind_of(e), e.id))
        args += [models.entity_version(e), encode(e), _ttl_ms(e)]
        if len(names) == BATCH:
            run_script(client, "set_many_if_newer", names, args, pipe=pipe)
            names, args = [], []
    if names:
        run_script(client, "set_many_if_newer", names, args, pipe=pipe)


def fill_missing_or_older(client: Client, ns: str, entities: list[models.Entity]) -> int:
    """Bring the cache up to ``entities`` in bulk (the rebuild); return how many were written.

    One MGET per chunk shows what Redis holds: entries already at that version
    (the usual case after a coordinator crash) cost nothing more, absent ones
    are written with ``SET NX`` (a concurrent writer's value is never older),
    and only older or corrupt ones go through the versioned Lua fill.
    """
    written = 0
    for chunk in chunks(entities, 1000):
        names = [keys.entity(ns, kind_of(e), e.id) for e in chunk]
        current: list[str | None] = client.call("cache mget", lambda n=names: client.redis.mget(n))  # type: ignore[misc]

        def write(chunk: list[models.Entity] = chunk, names: list[str] = names,
                  current: list[str | None] = current) -> int:
            pipe = client.pipeline()
            stale: list[models.Entity] = []
            n = 0
            for e, name, raw in zip(chunk, names, current, strict=True):
                if raw is None:
                    pipe.set(name, encode(e), nx=True, px=_ttl_ms(e) or None)
                    n += 1
                elif (version_of(raw) or -1) < models.entity_version(e):
                    stale.append(e)
            put(client, ns, stale, pipe=pipe)
            pipe.execute()
            return n + len(stale)

        written += client.call("cache fill", write)
    return written


def force_put(ns: str, entities: Iterable[models.Entity], *, pipe: Any) -> None:
    """Queue unconditional writes of ``entities`` on ``pipe`` (repair: PostgreSQL wins)."""
    for e in entities:
        ttl = _ttl_ms(e)
        pipe.set(keys.entity(ns, kind_of(e), e.id), encode(e), px=ttl or None)


def delete(ns: str, kind: str, ids: Iterable[str], *, pipe: Any) -> None:
    """Queue removal of cached entities on ``pipe``."""
    names = [keys.entity(ns, kind, i) for i in ids]
    if names:
        pipe.unlink(*names)


def get(client: Client, ns: str, kind: str, entity_id: str) -> models.Entity | None:
    """Return a cached entity, or None on a miss."""
    raw = client.call("cache get", lambda: client.redis.get(keys.entity(ns, kind, entity_id)))
    return decode(kind, raw)


def get_raw_many(client: Client, ns: str, kind: str, ids: list[str]) -> list[str | None]:
    """Return the raw cache values of many entities (one MGET per 1,000 ids)."""
    out: list[str | None] = []
    for chunk in chunks(ids, 1000):
        names = [keys.entity(ns, kind, i) for i in chunk]

        def read(names: list[str] = names) -> list[str | None]:
            return list(client.redis.mget(names))

        out.extend(client.call("cache mget", read))
    return out


def scan_ids(client: Client, ns: str, kind: str, *, count: int = 1000) -> Iterator[str]:
    """Yield the ids of every cached entity of ``kind`` (SCAN, never KEYS)."""
    head = len(keys.entity(ns, kind, ""))
    pattern = keys.entity_pattern(ns, kind)
    with client.translate("cache scan"):
        for key in client.redis.scan_iter(match=pattern, count=count):
            yield key[head:]


INVALIDATION_BATCH = 1000
"""Most entities one invalidation message announces."""


def publish(ns: str, kind: str, entity_id: str, version: int, *, pipe: Any) -> None:
    """Queue an invalidation message for one entity on ``pipe``: ``"<kind>|<version>|<id>"``."""
    pipe.publish(keys.invalidation_channel(ns), f"{kind}|{version}|{entity_id}")


def publish_many(ns: str, changed: Iterable[tuple[str, int, str]], *, pipe: Any) -> None:
    """Queue invalidation messages for many ``(kind, version, id)`` on ``pipe``.

    One entity goes out as a single message (:func:`publish`); more go out as
    a JSON array of ``[kind, version, id]`` triples, one PUBLISH per
    :data:`INVALIDATION_BATCH` entities. :func:`parse_invalidations` reads both.
    """
    items = list(changed)
    channel = keys.invalidation_channel(ns)
    for chunk in chunks(items, INVALIDATION_BATCH):
        if len(chunk) == 1:
            kind, version, entity_id = chunk[0]
            publish(ns, kind, entity_id, version, pipe=pipe)
        else:
            pipe.publish(channel, orjson.dumps(chunk))


def parse_invalidation(message: str) -> tuple[str, int, str] | None:
    """Return ``(kind, version, id)`` of a single-entity message, or None if malformed."""
    kind, _, rest = message.partition("|")
    version, _, entity_id = rest.partition("|")
    try:
        return kind, int(version), entity_id
    except ValueError:
        return None


def parse_invalidations(message: str) -> list[tuple[str, int, str]]:
    """Return every ``(kind, version, id)`` an invalidation message announces.

    Reads both forms :func:`publish_many` sends; a malformed message or
    triple is skipped.
    """
    if not message.startswith("["):
        one = parse_invalidation(message)
        return [one] if one is not None else []
    try:
        triples = orjson.loads(message)
    except orjson.JSONDecodeError:
        return []
    out: list[tuple[str, int, str]] = []
    for t in triples if isinstance(triples, list) else ():
        if (isinstance(t, list) and len(t) == 3 and isinstance(t[0], str)
                and type(t[1]) is int and isinstance(t[2], str)):
            out.append((t[0], t[1], t[2]))
    return out
