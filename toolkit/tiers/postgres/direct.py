"""The hot statements run on psycopg's own cursor: Core built once, compiled once, no per-call layers.

A job's claim, start, completion, failure, release and roll-up are a few fixed statements
run thousands of times a second. Through ``Connection.execute`` each call pays for
SQLAlchemy's execution context, cache-key lookup, parameter processing and result wrapping,
which measured larger than the statement's own round trip to a local server. Here a
statement is still SQLAlchemy Core (built once, in the module that owns it) and is compiled
**once per schema**: its text with ``$1..$n`` placeholders, the names in that order and the
type processors of its parameters. A call binds the values, runs it on a
:class:`psycopg.RawCursor` (server-side binding; psycopg prepares it on the server after a
few runs where the connection allows, see ``db.PREPARE_THRESHOLD``) and returns plain dicts.
Results need no processing: the connection's own loaders already give aware datetimes, lists
and JSON decoded by the engine's deserializer, exactly as a normal read does.

A driver error goes through the SQLAlchemy connection's own handler, so a lost connection
is invalidated in the pool and ``Database.translate`` sees the usual ``DBAPIError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import psycopg
import sqlalchemy as sa

from toolkit.tiers.postgres import db

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")
_CACHE_LIMIT = 2048


class _Compiled(NamedTuple):
    stmt: sa.ClauseElement  # held so that its id is not reused while cached
    text: bytes
    names: tuple[str, ...]
    defaults: dict[str, Any]
    processors: dict[str, Callable[[Any], Any]]
    keys: list[str]  # the result's column names, read from the first result (fixed per statement)


_cache: dict[tuple[int, str | None, int], _Compiled] = {}


def _to_dollar(text: str) -> tuple[str, tuple[str, ...]]:
    """``%(name)s`` placeholders as ``$n`` (a name used twice keeps one number); ``%%`` as ``%``."""
    order: dict[str, int] = {}

    def number(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return "%"
        return f"${order.setdefault(name, len(order) + 1)}"

    return _PLACEHOLDER.sub(number, text), tuple(order)


def _compile(conn: sa.Connection, stmt: sa.ClauseElement) -> _Compiled:
    schema_map = conn.get_execution_options().get("schema_translate_map")
    key = (id(stmt), (schema_map or {}).get(None), id(conn.dialect))
    found = _cache.get(key)
    if found is not None and found.stmt is stmt:
        return found
    compiled = db.compile_for(conn, stmt)
    if "__[POSTCOMPILE_" in compiled.string:
        raise TypeError("a direct statement cannot expand an IN list at run time: "
                        "bind one array with = ANY(...) instead")
    text, names = _to_dollar(compiled.string)
    processors = {n: p for n, p in compiled._bind_processors.items() if n in names}
    defaults = {name: bp.effective_value for bp, name in compiled.bind_names.items()
                if not bp.required}
    found = _Compiled(stmt, text.encode(), names, defaults, processors, [])
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[key] = found
    return found


def rows(conn: sa.Connection, stmt: sa.ClauseElement,
         params: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
    """Run ``stmt`` in ``conn``'s transaction and return its rows as dicts (none: ``[]``)."""
    return cast(list[Mapping[str, Any]], dicts(conn, stmt, params))


def dicts(conn: sa.Connection, stmt: sa.ClauseElement,
          params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """As :func:`rows`, typed as the dicts they are (for a caller that pops keys)."""
    c = _compile(conn, stmt)
    values = {**c.defaults, **(params or {})}
    args = [c.processors[n](values[n]) if n in c.processors else values[n] for n in c.names]
    raw = conn.connection.driver_connection
    assert raw is not None
    cur = psycopg.RawCursor(raw)
    try:
        cur.execute(c.text, args)
        result = cur.pgresult
        if result is None or not result.nfields:
            return []
        if not c.keys:  # building ``description`` costs more than the rows: once per statement
            c.keys.extend(d.name for d in cur.description or ())
        keys = c.keys
        return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]
    except psycopg.Error as exc:
        conn._handle_dbapi_exception(exc, c.text.decode(), args, cast(Any, cur), None)
    finally:
        cur.close()


def first(conn: sa.Connection, stmt: sa.ClauseElement,
          params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The first row of :func:`rows`, or None."""
    found = dicts(conn, stmt, params)
    return found[0] if found else None
