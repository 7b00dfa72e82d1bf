"""The PostgreSQL connection pool and its one error-translation point."""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import orjson
import psycopg
import sqlalchemy as sa
from psycopg import sql as pgsql
from sqlalchemy import exc as sa_exc

from toolkit import config, errors

log = logging.getLogger(__name__)


PING_AFTER_IDLE = 0.5
"""Seconds a pooled connection may sit idle and still be handed out without a ping.

A ping costs a round trip, as much as a whole primary-key UPDATE. Like HikariCP's
``aliveBypassWindowMs`` (500 ms), a connection used that recently is trusted;
if the server went away in between, the call fails with ``StorageUnavailable``
(nothing written), the pool is emptied, and the next call reconnects.
"""


ROLLED_BACK = {
    "40001": "a serialization conflict with a concurrent transaction",
    "40P01": "a deadlock with a concurrent transaction",
    "57014": "statement_timeout or a cancel",
    "55P03": "lock_timeout",
    "25P02": "a statement of the transaction failed before its COMMIT",
}
"""SQLSTATEs after which PostgreSQL has rolled the transaction back: nothing was written."""
RETRYABLE = frozenset({"40001", "40P01"})
"""SQLSTATEs a whole transaction may simply be run again for (PostgreSQL's advice)."""


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a driver error, looked for along the ``__cause__`` chain."""
    while exc is not None:
        code = getattr(getattr(exc, "orig", exc), "sqlstate", None)
        if isinstance(code, str):
            return code
        exc = exc.__cause__
    return None


broken: weakref.WeakSet[sa.Connection] = weakref.WeakSet()
"""The connections of ``direct.explicit`` blocks a statement of which failed: every later
statement on them is refused (see ``direct``)."""


def broken_error() -> psycopg.Error:
    """The error of a statement or ``COMMIT`` refused in a transaction that failed."""
    return psycopg.errors.InFailedSqlTransaction(
        "a statement of this transaction failed; the server rolled it back")


def refuse_if_broken(conn: sa.Connection, *_: Any) -> None:
    """Refuse a statement on a connection of :data:`broken` (also SQLAlchemy's
    ``before_cursor_execute`` hook of the autocommit pool)."""
    if broken and conn in broken:
        raise broken_error()


def refuse_failed_commit(raw: psycopg.Connection[Any]) -> None:
    """Raise instead of committing a transaction one of whose statements failed.

    PostgreSQL answers such a ``COMMIT`` with a ``ROLLBACK`` and no error: a caller that
    caught the statement's error would take the transaction's writes as committed."""
    if raw.pgconn.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        raise broken_error()


def retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a serialization failure or a deadlock: run the transaction again."""
    return sqlstate(exc) in RETRYABLE


def compile_for(conn: sa.Connection, stmt: sa.ClauseElement) -> Any:
    """``stmt`` compiled for ``conn``: its dialect, and its schema written into the text as
    ``schema_translate_map`` would at execution (for psycopg's own cursor)."""
    schema_map = conn.get_execution_options().get("schema_translate_map")
    return stmt.compile(dialect=conn.dialect, schema_translate_map=schema_map,
                        render_schema_translate=True)


def driver_sql(conn: sa.Connection, stmt: sa.ClauseElement) -> tuple[pgsql.SQL, dict[str, Any]]:
    """A Core statement as psycopg runs it on the driver's own cursor: text and parameters.

    For what SQLAlchemy's execute cannot carry (``COPY (SELECT ...)``, binary and streamed
    reads): the statement is still built with Core, its values still bound.
    """
    compiled = compile_for(conn, stmt)
    return pgsql.SQL(compiled.string), dict(compiled.params)


PREPARE_THRESHOLD = 5
"""Runs of one statement on one connection after which psycopg prepares it on the server
(psycopg's own default), where :func:`toolkit.config.pg_prepare_mode` allows it."""


GENERIC_PLANS = "SET plan_cache_mode TO force_generic_plan"
"""What a connection of the single-statement pool runs when it prepares statements and reaches
the server itself (see :func:`_on_connect`)."""


def _on_connect(mode: str, synchronous_commit: str, generic_plans: bool = False
                ) -> Callable[[Any, Any], None]:
    """The hook each new connection runs: session time zone UTC, ``synchronous_commit`` off
    when asked, prepared statements or not.

    ``generic_plans`` (the single-statement pool: claims, completions, guarded updates and
    reads by id, and the roll-ups and releases of those transactions, keyed by a workflow):
    where ``auto`` found a direct connection, the server plans each prepared statement once
    (until an ANALYZE changes its tables), instead of again at every run. PostgreSQL
    otherwise re-plans a prepared statement whose generic plan looks dearer than a custom
    one, which a statement over ``unnest`` of an array parameter always does (the generic
    plan expects ten elements): a completion's statement was planned again at each of 65
    runs of 65 at 5,000 jobs, and a one-at-a-time drain spent 0.5-1.3 ms of server CPU per
    job more than with one plan. The roll-up's plan does depend on its workflow (one that
    holds most jobs makes the generic plan scan the table), but PostgreSQL chose that
    generic plan after five runs already. Never through a pooler, even with
    ``TOOLKIT_PG_PREPARE=on``: a session ``SET`` would stay on a server connection other
    clients share."""

    def setup(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("SET TIME ZONE 'UTC'")
        if synchronous_commit == "off":
            dbapi_connection.execute("SET synchronous_commit TO off")
        dbapi_connection.commit()  # before _direct, which may roll back
        direct = mode == "auto" and _direct(dbapi_connection)
        prepare = mode == "on" or direct
        if generic_plans and direct and dbapi_connection.info.server_version >= 120000:
            dbapi_connection.execute(GENERIC_PLANS)
        dbapi_connection.commit()
        dbapi_connection.prepare_threshold = PREPARE_THRESHOLD if prepare else None
        _mark_idle(dbapi_connection, record)  # just proven alive

    return setup


def plans_once(dbapi_connection: Any) -> bool:
    """Whether a statement here may run on a plan made once for any values: where psycopg
    prepares statements (PostgreSQL then keeps a generic plan after five runs, or at once
    under ``force_generic_plan``), on a server that has ``plan_cache_mode`` to say otherwise
    (12 or later). Elsewhere a statement goes unnamed and is planned with its values."""
    return (dbapi_connection.prepare_threshold is not None
            and dbapi_connection.info.server_version >= 120000)


def may_pipeline(dbapi_connection: Any) -> bool:
    """Whether statements may be pipelined on this connection (psycopg's pipeline mode):
    where it prepares statements (a direct connection, or ``TOOLKIT_PG_PREPARE=on``), since
    a pooler that cannot keep prepared statements may not keep a pipeline's order either;
    and only with a libpq that has pipeline mode (14 or later)."""
    return dbapi_connection.prepare_threshold is not None and psycopg.Pipeline.is_supported()


def _direct(dbapi_connection: Any) -> bool:
    """Whether this connection reaches the server itself, not a pooler or a proxy: over TCP,
    the server's own address and port are the ones dialled; over a Unix socket, the socket is
    one of the server's (its port, and its directory where the role may read
    ``unix_socket_directories``; PgBouncer's is ``/tmp/.s.PGSQL.6432``). Anything else, or
    anything this role cannot tell, counts as not direct."""
    info = dbapi_connection.info
    if not str(info.host).startswith("/"):
        addr, port = dbapi_connection.execute(
            "SELECT host(inet_server_addr()), inet_server_port()").fetchone()
        return (addr is not None and port is not None and int(port) == int(info.port)
                and str(addr) == str(info.hostaddr))
    local, port = dbapi_connection.execute(
        "SELECT inet_server_addr() IS NULL, current_setting('port')").fetchone()
    if not local or str(port) != str(info.port):
        return False
    try:
        dirs = dbapi_connection.execute(
            "SELECT current_setting('unix_socket_directories')").fetchone()[0]
    except psycopg.errors.InsufficientPrivilege:  # pg_read_all_settings only
        dbapi_connection.rollback()
        return False
    return str(info.host) in {d.strip() for d in str(dirs).split(",")}


def _mark_idle(_dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        record.info["idle_since"] = time.monotonic()


class _Losses:
    """When a connection of any of a Database's pools (two, one when read-only) was last found lost.

    SQLAlchemy empties only the pool that met the loss; a connection of the other pool
    that sat idle since before it is pinged at its next checkout, so one outage fails one
    call, as with a single pool."""

    def __init__(self) -> None:
        self.at = float("-inf")

    def note(self, context: sa.engine.ExceptionContext) -> None:
        if context.is_disconnect:
            self.at = time.monotonic()

    def ping_if_idle(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        """Ping a connection idle longer than :data:`PING_AFTER_IDLE`, or since a loss."""
        idle_since = record.info.get("idle_since", 0.0)
        if time.monotonic() - idle_since <= PING_AFTER_IDLE and idle_since > self.at:
            return
        try:
            dbapi_connection.execute("SELECT 1")
            dbapi_connection.commit()  # not rollback(): psycopg forgets its prepared statements
        except psycopg.Error as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise sa_exc.DisconnectionError(type(exc).__name__) from exc


_SETUP_STATES = {"42P01": "tables", "3F000": "tables", "42501": "privilege",
                 "3D000": "login", "28000": "login", "28P01": "login"}
"""SQLSTATEs that mean the server answered but the setup is wrong (see :func:`setup_problem`)."""
_SETUP_TEXTS = (("does not exist", "login"), ("password authentication failed", "login"),
                ("no pg_hba.conf entry", "login"), ("permission denied", "privilege"))
"""Fallbacks for connection failures, which carry no SQLSTATE in psycopg."""


def setup_problem(orig: BaseException, first: str) -> str | None:
    """Classify a driver error as a setup mistake: ``tables``, ``privilege``, ``login`` or None."""
    state = getattr(orig, "sqlstate", None)
    if state in _SETUP_STATES:
        return _SETUP_STATES[state]
    if (state is None and "FATAL" in first) or "permission denied" in first:
        return next((kind for text, kind in _SETUP_TEXTS if text in first), None)
    return None


def _engine(url: str, options: dict[str, Any], pool_size: int, connect_timeout: float,
            read_only: bool, losses: _Losses, synchronous_commit: str, *,
            single_statements: bool = False) -> sa.Engine:
    """One pool; ``single_statements``: the autocommit pool of single statements and explicit
    transactions (generic plans, see :func:`_on_connect`)."""
    kwargs: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if single_statements else {}
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=10,
        pool_pre_ping=False,  # _Losses.ping_if_idle instead: no round trip on a busy connection
        pool_recycle=1800,
        execution_options=options,
        json_deserializer=orjson.loads,
        connect_args={
            "connect_timeout": max(1, int(connect_timeout)),
            "application_name": "toolkit-inspector" if read_only else "toolkit",
            # No server-side prepared statements until the connect hook has seen
            # a direct connection (a transaction pooler such as PgBouncer hands each
            # transaction a different server connection): TOOLKIT_PG_PREPARE.
            "prepare_threshold": None,
        },
        **kwargs,
    )
    # Times come back in UTC; a SET (not a startup option, which PgBouncer
    # refuses) that the pooler tracks and re-applies.
    sa.event.listen(engine, "connect",
                    _on_connect(config.pg_prepare_mode(), synchronous_commit, single_statements))
    sa.event.listen(engine, "checkout", losses.ping_if_idle)
    sa.event.listen(engine, "checkin", _mark_idle)
    sa.event.listen(engine, "handle_error", losses.note)
    return engine


class Database:
    """A SQLAlchemy engine bound to one schema, translating driver errors.

    Parameters
    ----------
    url
        ``postgresql+psycopg://`` URL.
    schema
        Validated schema name; applied per connection with ``schema_translate_map``.
    read_only
        Run every transaction as ``READ ONLY`` (the server refuses writes).
    connect_timeout
        Seconds libpq may spend connecting (a silent server fails in bounded time).
    synchronous_commit
        ``"off"``: every session sets ``synchronous_commit = off`` (a commit returns before
        its WAL reaches the disk; see ``init_state_manager``). ``"on"``: left alone.
    """

    def __init__(
        self, url: str, schema: str, *, read_only: bool = False, connect_timeout: float = 5.0,
        pool_size: int = 5, synchronous_commit: str = "on",
    ) -> None:
        self.url = url
        self.schema = config.validate_schema(schema)
        self.where = config.host_port(url)
        options: dict[str, Any] = {"schema_translate_map": {None: schema}}
        if read_only:
            options["postgresql_readonly"] = True
        losses = _Losses()
        self.engine = _engine(url, options, pool_size, connect_timeout, read_only, losses,
                              synchronous_commit)
        # Its own pool, its connections autocommit from the start: an AUTOCOMMIT execution
        # option on the shared engine switched the isolation level at every checkout and
        # back at every return (29 us of CPU a checkout, 10 us this way). Each pool holds up
        # to pool_size + 10 connections, opened when first needed.
        # A read-only Database has no autocommit pool: READ ONLY is a property of a
        # transaction, and in autocommit there is none, so the server would take a write.
        # Its single statements run in the READ ONLY transactions of the one pool.
        self._autocommit = self.engine if read_only else _engine(
            url, options, pool_size, connect_timeout, read_only, losses, synchronous_commit,
            single_statements=True)
        if not read_only:
            sa.event.listen(self._autocommit, "before_cursor_execute", refuse_if_broken)

    def __repr__(self) -> str:
        return f"Database({config.mask_url(self.url)!r}, schema={self.schema!r})"

    @property
    def engines(self) -> tuple[sa.Engine, ...]:
        """The pools: transactions (:attr:`engine`) and single statements (:meth:`autocommit`);
        a read-only Database has only the first."""
        if self._autocommit is self.engine:
            return (self.engine,)
        return self.engine, self._autocommit

    def dispose(self) -> None:
        """Close every pooled connection."""
        for engine in self.engines:
            engine.dispose()

    @contextlib.contextmanager
    def translate(self, action: str) -> Iterator[None]:
        """Turn driver errors raised inside into toolkit errors."""
        try:
            yield
        except (sa_exc.IntegrityError, psycopg.IntegrityError) as exc:
            orig = getattr(exc, "orig", exc)
            diag = getattr(orig, "diag", None)
            name = getattr(diag, "constraint_name", None) or "constraint"
            detail = getattr(diag, "message_detail", None) or str(orig).splitlines()[0]
            raise errors.ValidationError(name, detail, f"rejected by PostgreSQL during {action}") from None
        except (sa_exc.DBAPIError, psycopg.Error) as exc:
            orig = getattr(exc, "orig", exc)
            first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
            first = config.scrub(first, self.url)
            self._raise_if_setup(orig, first, action)
            why = ROLLED_BACK.get(sqlstate(exc) or "")
            if why is not None:
                first += f" ({why}; rolled back, nothing written)"
            raise errors.StorageUnavailable(
                f"PostgreSQL at {self.where} failed during {action}: {first}"
            ) from exc
        except sa_exc.SQLAlchemyError as exc:
            raise errors.StorageUnavailable(
                f"PostgreSQL at {self.where} failed during {action}: {type(exc).__name__}"
            ) from exc

    def _raise_if_setup(self, orig: BaseException, first: str, action: str) -> None:
        """Raise :class:`~toolkit.errors.SetupError` when the server answered with a setup mistake."""
        kind = setup_problem(orig, first)
        if kind is None:
            return
        check = {
            "tables": f"schema {self.schema!r} has no toolkit tables: check the schema and the "
                      "database (--schema/--database-url); init_state_manager creates them",
            "privilege": "this role lacks a privilege: check the role in the URL and its GRANTs",
            "login": "check the database, role and password in the URL",
        }[kind]
        raise errors.SetupError(
            f"PostgreSQL at {self.where} answered during {action}: {first}; {check}") from orig

    @contextlib.contextmanager
    def begin(self, action: str) -> Iterator[sa.Connection]:
        """Open a transaction; commit on success, roll back on any error."""
        with self.translate(action), self.engine.begin() as conn:
            yield conn
            refuse_failed_commit(cast(psycopg.Connection[Any], conn.connection.driver_connection))

    @contextlib.contextmanager
    def autocommit(self, action: str) -> Iterator[sa.Connection]:
        """A connection where each statement commits by itself.

        For a change that is ONE statement: it is as atomic as in :meth:`begin`,
        and saves the ``BEGIN`` and ``COMMIT`` round trips (two of three). On a
        read-only Database, a ``READ ONLY`` transaction rolled back at the end.
        """
        with self.translate(action), self._autocommit.connect() as conn:
            yield conn

    def quote(self, name: str) -> str:
        """Return ``name`` quoted as a PostgreSQL identifier."""
        return self.engine.dialect.identifier_preparer.quote_identifier(name)
