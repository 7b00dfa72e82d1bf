"""Four worker processes stepping in fused batches at once (``run_worker(batch=10)``: each
batch's completions and the next claims in one transaction), over workflows whose second half
waits for the first: every job runs once, is claimed once and completed once, and the
workflows end completed. The claims and the completions of the processes lock the same
workflows from one transaction; a deadlock PostgreSQL breaks is run again, never seen here."""

from __future__ import annotations

import json
from collections import Counter

import psycopg
from psycopg import sql

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import assert_invariants, run_children

WORKER = r"""
import json, os, sys, time, redis, toolkit
ns, schema, wid, n = sys.argv[1:5]
sm = toolkit.init_state_manager(namespace=ns, schema=schema, rebuild=False)
raw = redis.Redis.from_url(os.environ["REDIS_URL"])
raw.incr(f"{{{ns}}}:test:ready")  # start together: one process alone would take every job
while int(raw.get(f"{{{ns}}}:test:ready")) < int(n):
    time.sleep(0.01)
ran = []
report = sm.run_worker(wid, lambda job: ran.append(job.id) or {"by": wid}, batch=10,
                       idle_timeout=1.0, poll=0.1)
print(json.dumps({"ran": ran, "completed": report.completed, "lost": report.lost}))
sm.close()
"""


def test_four_processes_in_fused_batches_run_each_job_once(
        sm: toolkit.StateManager, clean: Servers, raw_redis) -> None:
    for k in range(3):  # the second half of each workflow waits for the first (releases)
        sm.create_workflow(f"wf{k}", jobs=[
            {"name": f"j{i}", "priority": i % 3, "depends_on": [f"j{i - 150}"] if i >= 150 else []}
            for i in range(300)])
    outs = [json.loads(o) for o in run_children(clean, WORKER, [[f"p{i}", "4"] for i in range(4)], 180)]
    ran = Counter(j for out in outs for j in out["ran"])  # type: ignore[attr-defined]
    assert len(ran) == 900 and set(ran.values()) == {1}, ran.most_common(3)
    assert sum(out["completed"] for out in outs) == 900  # type: ignore[misc]
    assert all(out["lost"] == 0 for out in outs)
    assert sum(1 for out in outs if out["completed"]) >= 2, "one process took every job"
    schema = sql.Identifier(clean.schema)
    with psycopg.connect(clean.libpq_url, autocommit=True) as conn:
        events = Counter((r[0], r[1]) for r in conn.execute(sql.SQL(
            "SELECT job_id, event FROM {}.job_events WHERE event IN ('assigned', 'completed')"
        ).format(schema)))
        assignments = Counter(r[0] for r in conn.execute(sql.SQL(
            "SELECT job_id FROM {}.job_assignments").format(schema)))
    assert len(events) == 1800 and set(events.values()) == {1}, events.most_common(3)
    assert len(assignments) == 900 and set(assignments.values()) == {1}
    assert {w.status for w in sm.list_workflows()} == {toolkit.WorkflowStatus.COMPLETED}
    assert_invariants(sm, raw_redis, clean.libpq_url)
