"""The benchmark's hand-written floor makes the toolkit's state changes per job, and cleans up.

``benchmarks.flow_floor`` is what ``flow.*.vs_floor`` divides by: if it skipped a
change the toolkit makes (a row, an event, a status move), the ratio would lie.
So the state both leave in PostgreSQL for the flow's jobs is compared job by job.
No peer package is needed (the peers are not imported).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from benchmarks import flow, flow_floor, harness, queues
from tests.conftest import Servers
from toolkit import scenarios

N = 23  # not a multiple of the batch: the last batch is short


def _bench(servers: Servers) -> harness.Bench:
    target = scenarios.Target(servers.database_url, servers.redis_url)
    return harness.Bench(target, "test", True, "test", {}, set())


def _signature(libpq_url: str, schema: str) -> Counter[tuple[Any, ...]]:
    """Per job: status, attempts, version, timestamps set, its assignments, its flow events."""
    q = sql.SQL("""
        SELECT j.status, j.attempts, j.version, j.worker_id IS NOT NULL,
               j.started_at IS NOT NULL, j.finished_at IS NOT NULL,
               (SELECT array_agg(a.status || ':' || a.attempt || ':' || (a.finished_at IS NOT NULL)
                                 ORDER BY a.status) FROM {a} a WHERE a.job_id = j.id),
               (SELECT array_agg(e.event || ':' || e.status || ':' || e.attempt || ':'
                                 || (e.worker_id = j.worker_id) ORDER BY e.event)
                FROM {e} e WHERE e.job_id = j.id AND e.event IN ('assigned', 'started', 'completed'))
        FROM {j} j""").format(j=sql.Identifier(schema, "jobs"),
                              a=sql.Identifier(schema, "job_assignments"),
                              e=sql.Identifier(schema, "job_events"))
    with psycopg.connect(libpq_url) as conn:
        return Counter(tuple(tuple(v) if isinstance(v, list) else v for v in row)
                       for row in conn.execute(q).fetchall())


@pytest.mark.parametrize(("toolkit_loop", "floor_loop"), [
    (flow.drain_fused, flow_floor.drain_one),
    (flow.drain_batched, flow_floor.drain_batched),
], ids=["one_commit_per_job", "batches_of_100"])
def test_the_floor_leaves_the_state_the_toolkit_leaves(
        servers: Servers, toolkit_loop: Callable[..., int],
        floor_loop: Callable[[flow_floor.Floor, int], int]) -> None:
    bench = _bench(servers)
    with bench.state_manager("floortest") as sm:
        worker = sm.register_worker("w").id
        queues.queued_jobs(sm, N)
        assert toolkit_loop(sm, worker, N) == N
        want = _signature(servers.libpq_url, sm.settings.schema)
    with flow_floor.floor_worker(bench) as floor:
        floor.queue(N)
        assert floor_loop(floor, N) == N
        got = _signature(servers.libpq_url, floor.schema)
    assert sum(want.values()) == N
    assert got == want


def test_the_floor_removes_its_keys_and_its_schema(servers: Servers) -> None:
    bench = _bench(servers)
    with flow_floor.floor_worker(bench) as floor:
        floor.queue(5)
        assert flow_floor.drain_one(floor, 5) == 5
        key, schema = floor.key, floor.schema
        assert key.startswith(flow_floor.KEY_PREFIX)
        assert floor.commit_rate(0.05) > 0
    r = bench.redis()
    try:
        assert list(r.scan_iter(match=f"{key}*")) == []
    finally:
        r.close()
    with psycopg.connect(servers.libpq_url) as conn:
        assert conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                            (schema,)).fetchone() is None
