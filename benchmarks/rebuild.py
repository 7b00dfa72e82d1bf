"""Rebuild after a crash: time ``init_state_manager`` (connect + ``_rebuild_from_db``) on N live jobs.

    python -m benchmarks.rebuild --live 10000 100000 [--history 0] [--runs 3]

Runs on the embedded stack unless DATABASE_URL and REDIS_URL are set. Each
size gets its own schema and namespace, removed afterwards. Reports the
median (min, max) of ``--runs`` rebuilds, with Redis emptied before each one
so the rebuild writes every cache entry and queue again.
"""

from __future__ import annotations

import argparse
import statistics
import time

import toolkit
from toolkit import scenarios


def populate(sm: toolkit.StateManager, live: int, history: int, batch: int = 1000) -> None:
    """Create ``live`` queued jobs and ``history`` completed ones, in workflows of ``batch``."""
    total = live + history
    for start in range(0, total, batch):
        n = min(batch, total - start)
        sm.create_workflow(f"bench-{start}", jobs=[{"name": f"j{i}", "priority": i % 5,
                                                     "payload": {"i": i}} for i in range(n)])
    if history:
        import sqlalchemy as sa

        from toolkit.tiers.postgres import tables

        jobs = tables.jobs  # Core, not text(): the schema is applied by schema_translate_map
        oldest = sa.select(jobs.c.id).order_by(jobs.c.created_at, jobs.c.id).limit(history)
        with sm.db.begin("bench: finish history") as conn:
            conn.execute(sa.update(jobs).where(jobs.c.id.in_(oldest))
                         .values(status="completed", finished_at=sa.func.now()))


def wipe_redis(t: scenarios.Target, ns: str) -> None:
    """Empty one namespace so the next rebuild writes every cache entry and queue again."""
    scenarios.wipe_namespace(t.redis_url, ns)


def measure(t: scenarios.Target, live: int, history: int, runs: int) -> dict[str, float]:
    ns, schema = scenarios.fresh_names("bench_rebuild")
    sm = toolkit.init_state_manager(t.database_url, t.redis_url, namespace=ns, schema=schema)
    try:
        populate(sm, live, history)
        sm.close()
        times = []
        for _ in range(runs):
            wipe_redis(t, ns)
            started = time.perf_counter()
            fresh = toolkit.init_state_manager(t.database_url, t.redis_url, namespace=ns, schema=schema)
            times.append(time.perf_counter() - started)
            report = fresh.last_rebuild
            assert report is not None and report.jobs == live, report
            fresh.close()
        return {"live": live, "history": history, "median_s": statistics.median(times),
                "min_s": min(times), "max_s": max(times),
                "jobs_per_s": live / statistics.median(times)}
    finally:
        scenarios.cleanup(toolkit.init_state_manager(t.database_url, t.redis_url, namespace=ns,
                                                      schema=schema, rebuild=False), t, keep=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--live", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--history", type=int, default=0)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with scenarios.target() as t:
        where = "embedded stack" if t.stack else "servers from DATABASE_URL/REDIS_URL"
        print(f"| live jobs | history | rebuild median (s) | min | max | jobs/s | target: {where} |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for live in args.live:
            r = measure(t, live, args.history, args.runs)
            print(f"| {live:,} | {args.history:,} | {r['median_s']:.2f} | {r['min_s']:.2f} | "
                  f"{r['max_s']:.2f} | {r['jobs_per_s']:,.0f} | |", flush=True)


if __name__ == "__main__":
    main()
