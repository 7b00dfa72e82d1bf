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

Statements that do not need each other's results go out together (:func:`pipelined`,
psycopg's pipeline mode: one round trip), and a transaction can be opened by its first
statements (:func:`explicit`: ``BEGIN`` sent with them on an autocommit connection) instead
of by a ``BEGIN`` of its own: a completion's ``BEGIN``, claim, completion and release are one
round trip. Both only where the connection prepares statements (``db.may_pipeline``).

A driver error goes through the SQLAlchemy connection's own handler, so a lost connection
is invalidated in the pool and ``Database.translate`` sees the usual ``DBAPIError``.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn, cast

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


def _args(c: _Compiled, params: Mapping[str, Any] | None) -> list[Any]:
    values = {**c.defaults, **(params or {})}
    return [c.processors[n](values[n]) if n in c.processors else values[n] for n in c.names]


def _fetched(c: _Compiled, cur: psycopg.RawCursor[Any]) -> list[dict[str, Any]]:
    result = cur.pgresult
    if result is None or not result.nfields:
        return []
    if not c.keys:  # building ``description`` costs more than the rows: once per statement
        c.keys.extend(d.name for d in cur.description or ())
    keys = c.keys
    return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]


def _driver(conn: sa.Connection) -> psycopg.Connection[Any]:
    raw = conn.connection.driver_connection
    assert raw is not None
    return cast(psycopg.Connection[Any], raw)


def dicts(conn: sa.Connection, stmt: sa.ClauseElement,
          params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """As :func:`rows`, typed as the dicts they are (for a caller that pops keys)."""
    if conn in _pending_begin or (db.broken and conn in db.broken):
        return pipelined(conn, [(stmt, params or {})])[0]
    c = _compile(conn, stmt)
    args = _args(c, params)
    cur = psycopg.RawCursor(_driver(conn))
    try:
        cur.execute(c.text, args)
        return _fetched(c, cur)
    except psycopg.Error as exc:
        _raise(conn, exc, c.text.decode(), args, cur)
    finally:
        cur.close()


Call = tuple[sa.ClauseElement, Mapping[str, Any]]
"""A statement and its parameters, for :func:`pipelined`."""


def pipelined(conn: sa.Connection, calls: Sequence[Call]) -> list[list[dict[str, Any]]]:
    """Run the statements of ``calls`` in order, in ``conn``'s transaction, in ONE round trip.

    For statements that do not need each other's results: psycopg's pipeline mode sends them
    together (with the ``BEGIN`` of an :func:`explicit` transaction not yet open) and reads
    every result after one ``Sync``. Each still runs as its own statement, in order, seeing
    the ones before it. The first that fails aborts the rest and raises as :func:`rows`
    would. Where the connection may not pipeline (:func:`db.may_pipeline`: not a direct
    connection to the server), they run one by one, with the same results.
    """
    db.refuse_if_broken(conn)
    raw = _driver(conn)
    begin = conn in _pending_begin
    _pending_begin.discard(conn)
    if not db.may_pipeline(raw):
        if begin:
            _command(conn, _BEGIN)
        return [dicts(conn, stmt, params) for stmt, params in calls]
    compiled = [(_compile(conn, stmt), params) for stmt, params in calls]
    cursors: list[psycopg.RawCursor[Any]] = []
    text, args = _BEGIN, []
    try:
        with raw.pipeline():  # one Sync, on leaving the block
            if begin:
                cursors.append(cur := psycopg.RawCursor(raw))
                cur.execute(_BEGIN, prepare=False)
            for c, params in compiled:
                text, args = c.text, _args(c, params)
                cursors.append(cur := psycopg.RawCursor(raw))
                cur.execute(text, args)
        ours = cursors[1:] if begin else cursors
        return [_fetched(c, cur) for (c, _), cur in zip(compiled, ours, strict=True)]
    except psycopg.Error as exc:
        failed = _failed(cursors, compiled, begin)  # the statement the server refused
        if failed is not None:
            text, args = failed[0].text, _args(*failed)
        _raise(conn, exc, text.decode(), args, cursors[-1] if cursors else None)
    finally:
        for cur in cursors:
            cur.close()


def _failed(cursors: Sequence[psycopg.RawCursor[Any]],
            compiled: Sequence[tuple[_Compiled, Mapping[str, Any]]], begin: bool
            ) -> tuple[_Compiled, Mapping[str, Any]] | None:
    """The call of a pipeline whose statement failed on the server, if one is known."""
    ours = cursors[1:] if begin else cursors
    for cur, call in zip(ours, compiled, strict=False):
        result = cur.pgresult
        if result is not None and result.status == psycopg.pq.ExecStatus.FATAL_ERROR:
            return call
    return None


_BEGIN = b"BEGIN"
_pending_begin: weakref.WeakSet[sa.Connection] = weakref.WeakSet()
"""The connections (SQLAlchemy's, not the pooled ones: nothing outlives the block) whose
:func:`explicit` transaction waits for its first statement, which sends the ``BEGIN``."""
_explicit: weakref.WeakSet[sa.Connection] = weakref.WeakSet()
"""The connections inside an :func:`explicit` block."""


def _raise(conn: sa.Connection, exc: psycopg.Error, text: str, args: Sequence[Any],
           cur: psycopg.RawCursor[Any] | None) -> NoReturn:
    if conn in _explicit:
        # SQLAlchemy rolls back here (it sees no transaction): what ran before is gone, and
        # each later statement would commit by itself. They are refused instead (here, and
        # SQLAlchemy's by db.refuse_if_broken), and so is the block's COMMIT.
        db.broken.add(conn)
    conn._handle_dbapi_exception(exc, text, args, cast(Any, cur), None)
    raise AssertionError("unreachable")  # SQLAlchemy raised


def _command(conn: sa.Connection, text: bytes) -> None:
    cur = psycopg.RawCursor(_driver(conn))
    try:
        cur.execute(text, prepare=False)
    except psycopg.Error as exc:
        _raise(conn, exc, text.decode(), [], cur)
    finally:
        cur.close()


@contextlib.contextmanager
def explicit(conn: sa.Connection) -> Iterator[sa.Connection]:
    """Make the block ONE transaction on ``conn``, an autocommit connection, whose ``BEGIN``
    goes out with the block's first statement instead of in a round trip of its own (a
    non-autocommit psycopg connection sends it alone, and waits for it even in pipeline
    mode). ``COMMIT`` when the block ends; ``ROLLBACK`` when it raises.

    The block's first statement must go through this module (:func:`rows`, :func:`dicts`,
    :func:`pipelined`): one run by SQLAlchemy before it would have committed by itself. A
    block that ran none raises when it ends (a programming error, caught by the tests).
    """
    raw = _driver(conn)  # kept: after a lost connection, conn would open another
    if not raw.autocommit or raw.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("an explicit transaction needs an idle autocommit connection")
    _pending_begin.add(conn)
    _explicit.add(conn)
    try:
        yield conn
        if conn in _pending_begin:
            raise RuntimeError("an explicit transaction ran no statement through direct first")
        db.refuse_if_broken(conn)
        db.refuse_failed_commit(raw)
    except BaseException:
        _pending_begin.discard(conn)
        _explicit.discard(conn)
        db.broken.discard(conn)
        if not conn.invalidated and not raw.closed \
                and raw.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                raw.rollback()  # psycopg sends ROLLBACK whatever its autocommit setting
        raise
    _explicit.discard(conn)
    try:
        raw.commit()  # psycopg's own COMMIT: 35-40 us of CPU against a cursor's 50-55
    except psycopg.Error as exc:
        conn._handle_dbapi_exception(exc, "COMMIT", [], None, None)


def plans_once(conn: sa.Connection) -> bool:
    """:func:`db.plans_once` of ``conn``'s driver connection."""
    return db.plans_once(_driver(conn))


def first(conn: sa.Connection, stmt: sa.ClauseElement,
          params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The first row of :func:`rows`, or None."""
    found = dicts(conn, stmt, params)
    return found[0] if found else None
