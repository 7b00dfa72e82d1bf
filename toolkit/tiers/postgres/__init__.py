"""Tier 3: PostgreSQL, the source of truth.

One way to write SQL here: **SQLAlchemy Core** over the tables of ``tables.py``, always with
bound parameters: the entities in ``store.py``, ``lifecycle.py`` and ``batches.py``, the
records in ``records.py``, bulk operator actions in ``bulk.py``, the Inspector's reads in
``export.py`` (statements of a fixed shape are built once and cached). One way to select the
schema: **per connection**, by ``schema_translate_map`` (``db.Database``), so no statement
names its schema; where psycopg runs a Core statement on its own cursor (streamed and binary
reads, ``COPY``), ``db.driver_sql`` compiles it with that same map, and so does ``direct.py``
for the hot statements (a job's claim, start, completion, failure, release and roll-up), which
it compiles once per schema and runs on psycopg's cursor without SQLAlchemy's per-call layers.

Literal SQL is left to what Core cannot express, and a test
(``tests/unit/test_sql_ways.py``) holds every module to it: ``psycopg.sql`` wraps ``COPY``
(binary in for bulk writes, binary out for the rebuild, CSV out to Arrow around a compiled
SELECT in ``export.py``) and writes the two DDL statements of ``migrate.py`` that run before
any table exists (the migrations themselves are plain SQL files in ``migrations/``); short
``sa.text`` and driver strings carry transaction and session settings (``SET TRANSACTION``,
``SET LOCAL``, and ``direct.py``'s ``BEGIN``/``COMMIT``/``ROLLBACK`` of a transaction opened
by its first statements) and the partial indexes' predicates. Identifiers there come from validated
configuration, never text from a user.
"""
