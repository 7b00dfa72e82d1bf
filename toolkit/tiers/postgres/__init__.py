"""Tier 3: PostgreSQL, the source of truth.

One way to write SQL here: **SQLAlchemy Core**, built in ``store.py``, ``lifecycle.py``, ``batches.py`` and
``records.py`` (statements of a fixed shape are built once and cached), always with bound
parameters. The schema is chosen **per connection** by ``schema_translate_map``
(``db.Database``), so no statement names its schema. ``psycopg.sql`` composes only what Core
cannot express: ``COPY`` (binary in for bulk writes, binary out for the rebuild, CSV out to
Arrow in ``export.py``) and the DDL of ``migrate.py``; there the schema is an identifier taken
from validated configuration, never text from a user. Literal SQL (``sa.text``) is kept to
statements with no Core form (``SET TRANSACTION``, catalog lookups), named in ``store.py``.
"""
