"""``Inspector.jobs()`` on N rows against ADBC and ``pandas.read_sql``.

    python -m benchmarks.inspection [--quick] [--target ...]

N jobs are bulk-loaded (COPY, untimed) into a fresh schema. Every reader
fetches the same 17 columns of every job, ordered by ``created_at, id``.
Full: N = 1,000,000; quick: 20,000.

Cases
-----
inspector.jobs.vs_adbc
    ``Inspector.jobs()`` (COPY CSV -> Arrow -> pandas, dtypes conformed) against
    ``adbc-driver-postgresql`` ``fetch_arrow_table().to_pandas(types_mapper=pd.ArrowDtype)``.
    Goal: <= 3x the ADBC time.
inspector.jobs.vs_read_sql
    The same against ``pandas.read_sql`` over a SQLAlchemy engine. Goal: at least
    2x faster (time ratio <= 0.5).
inspector.jobs.payload_search.vs_no_index
    ``Inspector.jobs(payload={"i": 7})`` (one job in 1,000 matches) with the GIN index of
    migration 0007 against the same call after ``DROP INDEX ix_jobs_payload`` (a sequential
    scan; the index is built again afterwards). Goal: ratio <= 0.5 at the full size; at the
    quick size (20,000 jobs) a frame's fixed cost (three read-only queries) dominates both
    sides and the ratio is near 0.7.
"""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

import toolkit
from benchmarks import harness

COLUMNS = ("id", "workflow_id", "worker_id", "name", "status", "queue", "priority", "attempts",
           "max_attempts", "version", "error", "payload", "result", "created_at", "updated_at",
           "started_at", "finished_at")


def _query(schema: str) -> str:
    cols = ", ".join(f"{c}::text AS {c}" if c in ("payload", "result") else c for c in COLUMNS)
    return f'SELECT {cols} FROM "{schema}".jobs ORDER BY created_at, id'  # schema: fresh_names


def _adbc(bench: harness.Bench, query: str) -> int:
    from adbc_driver_postgresql import dbapi

    with dbapi.connect(harness.pg_dsn(bench.target.database_url)) as conn, conn.cursor() as cur:
        cur.execute(query)
        frame = cur.fetch_arrow_table().to_pandas(types_mapper=pd.ArrowDtype)
    return len(frame)


def _has_adbc() -> bool:
    try:
        import adbc_driver_postgresql.dbapi  # noqa: F401
    except ImportError:
        print("   adbc-driver-postgresql is not installed: inspector.jobs.vs_adbc not run "
              "(pip install adbc-driver-postgresql)", flush=True)
        return False
    return True


def _read_sql(engine: sa.Engine, query: str) -> int:
    with engine.connect() as conn:
        return len(pd.read_sql(sa.text(query), conn))


def run(bench: harness.Bench) -> None:
    n = bench.n(1_000_000, 20_000)
    runs = 3
    with bench.state_manager("inspect", rebuild=False) as sm:
        schema = sm.settings.schema
        harness.add_raw_jobs(bench, schema, n, status="completed")
        query = _query(schema)
        ins = toolkit.Inspector(bench.target.database_url, bench.target.redis_url,
                                namespace=sm.ns, schema=schema)
        engine = sa.create_engine(bench.target.database_url)
        try:
            assert len(ins.jobs()) == n
            if bench.wants("inspector.jobs.vs_adbc") and _has_adbc():
                tk, adbc = harness.paired_runs(ins.jobs, lambda: _adbc(bench, query), runs)
                bench.record("inspection", "inspector.jobs.vs_adbc", n, harness.duration(tk),
                             harness.duration(adbc), harness.at_most(3.0),
                             floor_name="ADBC -> Arrow pandas")
            if bench.wants("inspector.jobs.vs_read_sql"):
                tk, slow = harness.paired_runs(ins.jobs, lambda: _read_sql(engine, query), runs)
                bench.record("inspection", "inspector.jobs.vs_read_sql", n, harness.duration(tk),
                             harness.duration(slow), harness.at_most(0.5),
                             floor_name="pandas.read_sql (SQLAlchemy)")
            if bench.wants("inspector.jobs.payload_search"):
                _payload_search(bench, ins, schema, n)
        finally:
            ins.close()
            engine.dispose()


def _payload_search(bench: harness.Bench, ins: toolkit.Inspector, schema: str, n: int) -> None:
    from psycopg import sql

    def search() -> int:
        return len(ins.jobs(payload={"i": 7}))

    assert search() == n // 1000 + (1 if n % 1000 > 7 else 0)
    indexed = [harness.time_once(search) for _ in range(bench.runs)]
    index = sql.Identifier(schema, "ix_jobs_payload")
    with bench.pg() as conn:
        conn.execute(sql.SQL("DROP INDEX {}").format(index))
    try:
        scanned = [harness.time_once(search) for _ in range(bench.runs)]
    finally:
        with bench.pg() as conn:
            conn.execute(sql.SQL("CREATE INDEX {} ON {} USING gin (payload jsonb_path_ops)").format(
                sql.Identifier("ix_jobs_payload"), sql.Identifier(schema, "jobs")))
    bench.record("inspection", "inspector.jobs.payload_search.vs_no_index", n,
                 harness.duration(indexed), harness.duration(scanned), harness.at_most(0.5),
                 floor_name="the same search without the GIN index (sequential scan)")


if __name__ == "__main__":
    harness.main(run, __doc__)
