"""The PostgreSQL-backed peers' side of ``benchmarks.pg_peers``: pgqueuer and procrastinate.

Runs inside ``benchmarks/.peers-venv`` (neither is a toolkit dependency),
configured by environment variables:

``BENCH_PG_DSN``     the PostgreSQL the toolkit uses in the run (a libpq URL)
``BENCH_REDIS_URL``  where the no-op task writes its time marks
``BENCH_PREFIX``     the run's own PostgreSQL schema (created and dropped by the
                     harness); also the procrastinate queue name, pgqueuer's
                     object prefix and so its LISTEN/NOTIFY channel, and the
                     prefix of the mark keys

    python _pg_peer_app.py enqueue pgqueuer|procrastinate N   # install the peer's tables, enqueue N
    python _pg_peer_app.py work pgqueuer BATCH               # QueueManager.run(batch_size=BATCH, drain)
    python _pg_peer_app.py work procrastinate 1              # run_worker(concurrency=1, wait=False)
    python _pg_peer_app.py versions

Every connection sets ``search_path`` to the run's schema (libpq ``options``
for procrastinate's psycopg pool, ``server_settings`` for pgqueuer's asyncpg
connection: asyncpg is pgqueuer's default driver, and on this machine its
psycopg driver was slower and took 4 s to stop), and pgqueuer is told the
schema too (``PGQUEUER_SCHEMA``), so the peers' tables, types, functions and
triggers land in that schema only. The no-op
task records the wall-clock time of the first and the last job in
``<prefix>:first`` and ``<prefix>:last``, as ``_peer_app.py`` does; the worker
writes ``<prefix>:exit`` after it has returned (its buffered completions
committed).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import timedelta
from typing import Any

import redis

DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("BENCH_PREFIX", "benchpeer")
SCHEMA = PREFIX
OPTIONS = f"-c search_path={SCHEMA}"
# pgqueuer reads its settings from the environment once, on first use.
os.environ["PGQUEUER_SCHEMA"] = SCHEMA
os.environ["PGQUEUER_PREFIX"] = f"{PREFIX}_"

_marks = redis.Redis.from_url(URL)


def mark(i: int, last: int) -> None:
    """The no-op job: note the time of the first and the last one."""
    if i == 0:
        _marks.set(f"{PREFIX}:first", repr(time.time()))
    if i == last:
        _marks.set(f"{PREFIX}:last", repr(time.time()))


# -- pgqueuer -------------------------------------------------------------------------------

async def _pgq_driver() -> Any:
    """pgqueuer's default driver (asyncpg) on one connection in the run's schema."""
    import asyncpg
    from pgqueuer import AsyncpgDriver

    return AsyncpgDriver(await asyncpg.connect(DSN, server_settings={"search_path": SCHEMA}))


async def enqueue_pgqueuer(n: int) -> None:
    from pgqueuer import Queries

    driver = await _pgq_driver()
    try:
        queries = Queries(driver)
        await queries.install(create_schema=False)
        for start in range(0, n, 1000):
            ids = range(start, min(n, start + 1000))
            await queries.enqueue(["noop"] * len(ids), [f"{i},{n - 1}".encode() for i in ids],
                                  [0] * len(ids))
    finally:
        await driver._connection.close()


async def work_pgqueuer(batch: int) -> None:
    from pgqueuer import Queries, QueueManager
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    driver = await _pgq_driver()
    try:
        qm = QueueManager(Queries(driver))

        @qm.entrypoint("noop")
        async def noop(job: Job) -> None:
            i, last = (job.payload or b"0,0").decode().split(",")
            mark(int(i), int(last))

        await qm.run(batch_size=batch, mode=QueueExecutionMode.drain,
                     dequeue_timeout=timedelta(seconds=0.2))
    finally:
        await driver._connection.close()


# -- procrastinate --------------------------------------------------------------------------

def _procrastinate_app() -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=DSN, kwargs={"options": OPTIONS}))

    @app.task(name="noop", queue=PREFIX)
    async def noop(i: int, last: int) -> None:
        mark(i, last)

    return app


async def enqueue_procrastinate(n: int) -> None:
    app = _procrastinate_app()
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        task = app.tasks["noop"]
        for start in range(0, n, 1000):
            await task.batch_defer_async(*({"i": i, "last": n - 1}
                                           for i in range(start, min(n, start + 1000))))


async def work_procrastinate() -> None:
    app = _procrastinate_app()
    async with app.open_async():
        await app.run_worker_async(queues=[PREFIX], concurrency=1, wait=False,
                                   name=f"{PREFIX}-worker")


# -- command line ---------------------------------------------------------------------------

def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("pgqueuer", "asyncpg", "procrastinate", "psycopg")}


def main(argv: list[str]) -> None:
    command, peer, arg = argv[0], argv[1], int(argv[2])
    if command == "enqueue":
        asyncio.run((enqueue_pgqueuer if peer == "pgqueuer" else enqueue_procrastinate)(arg))
    elif command == "work":
        asyncio.run(work_pgqueuer(arg) if peer == "pgqueuer" else work_procrastinate())
        _marks.set(f"{PREFIX}:exit", repr(time.time()))
    else:
        raise SystemExit(f"unknown command: {' '.join(argv)}")


if __name__ == "__main__":
    # Run from the module imported by name: procrastinate warns about an App built in ``__main__``.
    import _pg_peer_app

    if sys.argv[1:] == ["versions"]:
        print(_pg_peer_app.versions())
    else:
        _pg_peer_app.main(sys.argv[1:])
