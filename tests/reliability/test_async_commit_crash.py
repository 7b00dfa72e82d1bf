"""A PostgreSQL server crash under the opt-in ``synchronous_commit="off"`` (issue 18).

The mode's documented loss: a server crash takes the commits acknowledged just before it,
while Redis may already hold them. Here the private server is crashed for real (an immediate
shutdown: no checkpoint, WAL still in memory never written) right after a burst of
acknowledged completions, restarted (it recovers from its log), and a new coordinator asks for
a fast start while the old one still runs: it must run the full rebuild instead, after which
every tier agrees with what PostgreSQL kept.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psycopg
import pytest

from tests.reliability.conftest import Private, assert_invariants, pg_job_statuses, retry_storage
from toolkit import compare
from toolkit.tiers.redis import keys


def _cached_status(raw: object, ns: str, job_id: str) -> str | None:
    value = raw.get(keys.entity(ns, "job", job_id))  # type: ignore[attr-defined]
    return None if value is None else str(json.loads(value.split("|", 1)[1])["status"])


def _crash(private: Private, how: str) -> None:
    """``server``: an immediate shutdown, then a start. ``backend``: SIGKILL one backend of
    the coordinator; the postmaster stays up, ends every session and recovers from its log
    (its start time does not change)."""
    if how == "server":
        private.stack.crash_postgres()
        private.stack.start_postgres()
        return
    with psycopg.connect(private.libpq_url, autocommit=True) as conn:
        pid = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'toolkit' "
                           "AND pid <> pg_backend_pid() LIMIT 1").fetchone()
    assert pid is not None
    os.kill(int(pid[0]), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the crash recovery ends every session, this one's too: wait until it is over
        try:
            time.sleep(0.2)
            with psycopg.connect(private.libpq_url, autocommit=True, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "PostgreSQL did not come back"


@pytest.mark.parametrize("how", ["server", "backend"])
def test_a_postgres_crash_under_async_commits_is_followed_by_the_full_rebuild(
        private: Private, how: str) -> None:
    sm = private.manager(synchronous_commit="off")
    raw = private.raw_redis()
    try:
        sm.create_workflow("burst", jobs=[{"name": f"j{i}"} for i in range(400)])
        sm.register_worker("w1")
        acked: list[str] = []
        job = sm.dequeue("w1", start=True)
        while job is not None and len(acked) < 300:
            done, job = sm.complete_and_dequeue(job.id, {"n": len(acked)}, worker_id="w1",
                                                start=True)
            acked.append(done.id)
        _crash(private, how)

        kept = pg_job_statuses(private.libpq_url, private.schema)
        lost = [j for j in acked if kept[j] != "completed"]
        # Redis holds every acknowledged completion, the lost ones too (ahead of PostgreSQL).
        assert all(_cached_status(raw, private.namespace, j) == "completed" for j in acked)

        # The old coordinator ran on through the crash: its check says what it may hold.
        assert retry_storage(sm.check_consistency).warnings == (compare.CRASH_WARNING,)
        after = private.manager(rebuild="fast")  # the old coordinator's watermark is fresh
        try:
            assert after.last_fast_start is None, after.last_fast_start  # the full rebuild ran
            assert after.check_consistency().warnings == ()
            assert_invariants(after, raw, private.libpq_url)
            for j in lost:  # nothing PostgreSQL lost is served any more, from any tier
                assert after.get_job(j).status.value == kept[j], (j, kept[j])
                assert _cached_status(raw, private.namespace, j) in (None, kept[j])
            print(f"{how}: {len(lost)} of {len(acked)} acknowledged completions lost")
        finally:
            after.close()
    finally:
        raw.close()
        sm.close()
