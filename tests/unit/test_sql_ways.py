"""One way to write SQL, as the PostgreSQL tier's docstring states it, checked on the source.

Every statement is SQLAlchemy Core over ``tables.py``. Literal SQL is allowed only
where Core has no form, and only in the places named here: ``psycopg.sql`` wraps
``COPY`` around a compiled statement or a table, and writes the migration DDL;
``sa.text`` and raw strings carry transaction and session settings and the
partial index's predicate. A module that composes a SELECT by hand fails this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLKIT = REPO / "toolkit"

LITERAL_SQL_ALLOWED = {
    # module: the statement beginnings it may write as literal SQL
    # the connect hook, on the driver's connection: session settings and catalog lookups
    "tiers/postgres/db.py": ("SET TIME ZONE", "SET synchronous_commit", "SELECT 1",
                             "SELECT host(inet_server_addr())",
                             "SELECT inet_server_addr() IS NULL",
                             "SELECT current_setting('unix_socket_directories')"),
    "tiers/postgres/export.py": ("COPY (", "SET TRANSACTION READ ONLY"),
    "tiers/postgres/records.py": ("COPY ", ","),  # binary COPY of the event log
    "tiers/postgres/store.py": ("COPY ", ",", "SET LOCAL enable_seqscan",  # binary COPY of jobs
                                "SET TRANSACTION ISOLATION LEVEL"),
    "tiers/postgres/migrate.py": ("CREATE SCHEMA IF NOT EXISTS", "SET LOCAL search_path"),
    "tiers/postgres/lifecycle.py": ("SET LOCAL plan_cache_mode",),  # the roll-up's own plans
    # partial-index predicates and an index order, as the migrations write them
    "tiers/postgres/tables.py": ("status NOT IN", "status = ", "priority DESC"),
    "local_stack.py": ("select 1",),
}
"""Where literal SQL may appear and how each statement may begin."""

_SQL_CALLS = {"SQL", "text", "exec_driver_sql", "execute"}
_SQL_WORDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "COPY", "CREATE", "DROP", "ALTER", "SET",
              "WITH", "TRUNCATE", "status", "priority", ", ")


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def literal_sql(path: Path) -> list[tuple[int, str]]:
    """Every string literal handed to a SQL-taking call in ``path``: (line, text)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and _call_name(node) in _SQL_CALLS and node.args):
            continue
        arg = node.args[0]
        if isinstance(arg, ast.JoinedStr):
            found.append((node.lineno, "<f-string>"))
        elif (isinstance(arg, ast.Constant) and isinstance(arg.value, str)
              and arg.value.lstrip().upper().startswith(tuple(w.upper() for w in _SQL_WORDS))):
            found.append((node.lineno, arg.value.strip()))
    return sorted(found)


def imports_psycopg_sql(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "psycopg" and any(
                a.name == "sql" for a in node.names):
            return True
        if isinstance(node, ast.Import) and any(a.name == "psycopg.sql" for a in node.names):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "sql" and getattr(
                node.value, "id", None) == "psycopg":
            return True
    return False


def test_literal_sql_only_where_core_has_no_form() -> None:
    wrong = []
    for path in sorted(TOOLKIT.rglob("*.py")):
        rel = path.relative_to(TOOLKIT).as_posix()
        allowed = LITERAL_SQL_ALLOWED.get(rel, ())
        wrong += [f"{rel}:{line}: {text[:60]!r}" for line, text in literal_sql(path)
                  if not text.startswith(allowed) or text == "<f-string>"]
    assert not wrong, ("literal SQL outside the allowed places; build the statement with "
                       "SQLAlchemy Core over toolkit.tiers.postgres.tables:\n" + "\n".join(wrong))


def test_psycopg_sql_only_in_the_postgres_tier() -> None:
    users = sorted(p.relative_to(TOOLKIT).as_posix() for p in TOOLKIT.rglob("*.py")
                   if imports_psycopg_sql(p))
    assert users, "the scan found no psycopg.sql at all: the check itself is broken"
    outside = [u for u in users if u not in LITERAL_SQL_ALLOWED]
    assert not outside, f"psycopg.sql composes SQL outside the PostgreSQL tier's COPY/DDL: {outside}"


def test_the_scan_sees_a_hand_written_select(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from psycopg import sql\n"
                      "q = sql.SQL('SELECT x FROM {}').format(sql.Identifier('t'))\n"
                      "conn.execute(sa.text('select 2'))\n")
    assert literal_sql(sample) == [(2, "SELECT x FROM {}"), (3, "select 2")]
    assert imports_psycopg_sql(sample)
