"""The flow's hand-written floor: the toolkit's state changes per job, by hand, raw psycopg + redis-py.

Used by ``benchmarks.flow_goals``. What one job costs the toolkit's worker loop,
written by hand with the least work that makes the same changes on the same
servers, in the same tables (a toolkit schema created by a StateManager, then
written to directly):

- claim: pop the job id from a Redis sorted set (``ZPOPMIN``), ``UPDATE`` the
  job row to running (worker, ``attempts + 1``, ``started_at``, version) where
  it is still queued, ``INSERT`` its active assignment row;
- complete: ``UPDATE`` the job row to completed (fenced by status and worker),
  end its active assignment (``UPDATE``);
- the job events of both (assigned, started, completed) in one ``INSERT ...
  SELECT FROM unnest(...)``;
- after each commit, one Redis pipeline ``SET`` of each changed job's record
  (JSON from ``row_to_json``, the cache entry).

Every statement is a server-side prepared statement (``prepare_threshold=0``),
each its own round trip, in an explicit transaction. :func:`drain_one` makes
one commit per job (complete the previous job and claim the next in one
transaction), :func:`drain_batched` one commit per batch of claims and one per
batch of completions (set-based statements over ``ANY``/``unnest``).

Not done by the floor (the toolkit does them): the in-flight set and claim lease
in Redis, dependency release, workflow roll-up and lock, counters, invalidation
messages, memory. Redis keys live under ``bench-floor-flow-<random>`` and are
removed afterwards; the tables are the caller's (a fresh schema, dropped by name).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from benchmarks import harness

KEY_PREFIX = "bench-floor-flow-"

_CLAIM = """UPDATE jobs SET status = 'running', worker_id = %(w)s, attempts = attempts + 1,
    started_at = %(now)s, version = version + 1, updated_at = %(now)s
  WHERE id = ANY(%(ids)s) AND status = 'queued'
  RETURNING id, workflow_id, attempts, row_to_json(jobs)::text"""
_ASSIGN = """INSERT INTO job_assignments (id, job_id, worker_id, status, attempt, assigned_at)
  SELECT a, j, %(w)s, 'active', n, %(now)s
  FROM unnest(%(aids)s::text[], %(ids)s::text[], %(attempts)s::int[]) AS u(a, j, n)"""
_COMPLETE = """UPDATE jobs SET status = 'completed', result = NULL, finished_at = %(now)s,
    version = version + 1, updated_at = %(now)s
  WHERE id = ANY(%(ids)s) AND status = 'running' AND worker_id = %(w)s
  RETURNING id, workflow_id, attempts, row_to_json(jobs)::text"""
_END = """UPDATE job_assignments SET status = 'completed', finished_at = %(now)s
  WHERE job_id = ANY(%(ids)s) AND status = 'active'"""
_EVENTS = """INSERT INTO job_events (job_id, workflow_id, event, status, worker_id, attempt, at)
  SELECT j, wf, e, s, %(w)s, n, %(now)s
  FROM unnest(%(ids)s::text[], %(wfs)s::text[], %(events)s::text[], %(statuses)s::text[],
              %(attempts)s::int[]) AS u(j, wf, e, s, n)"""

Row = tuple[str, str, int, str]  # id, workflow id, attempts, record JSON


class Floor:
    """One hand-written worker: a prepared-statement psycopg connection, a redis-py client."""

    def __init__(self, bench: harness.Bench, schema: str, worker: str, *,
                 synchronous_commit: str = "on") -> None:
        self.conn = psycopg.connect(harness.pg_dsn(bench.target.database_url), autocommit=True,
                                    prepare_threshold=0)
        self.conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        if synchronous_commit == "off":  # as the toolkit's opt-in: commits do not wait for the disk
            self.conn.execute("SET synchronous_commit TO off")
        self.r = bench.redis()
        self.key = f"{KEY_PREFIX}{uuid.uuid4().hex[:10]}"
        self.bench, self.schema, self.worker = bench, schema, worker

    def close(self) -> None:
        harness.unlink_prefix(self.r, f"{self.key}*")
        self.r.close()
        self.conn.close()

    # -- setup (untimed) --------------------------------------------------------------------

    def queue(self, n: int) -> None:
        """``n`` queued jobs (COPY, workflows of 1,000) and their ids in the Redis sorted set."""
        harness.add_raw_jobs(self.bench, self.schema, n, status="queued")
        rows = self.conn.execute("SELECT id, enqueue_seq FROM jobs WHERE status = 'queued'"
                                 ).fetchall()
        self.r.delete(self.key)
        for i in range(0, len(rows), 10_000):
            self.r.zadd(self.key, {jid: seq for jid, seq in rows[i:i + 10_000]})

    def commit_rate(self, seconds: float = 0.5) -> float:
        """Commits/s of this PostgreSQL now: one-row autocommit INSERTs for ``seconds`` (what
        bounds any one-commit-per-job loop, fsync included)."""
        self.conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (x int)")
        count, started = 0, time.perf_counter()
        while (took := time.perf_counter() - started) < seconds:
            self.conn.execute("INSERT INTO bench_commit_probe VALUES (1)")
            count += 1
        return count / took

    # -- the steps ----------------------------------------------------------------------------

    def _pop(self, n: int) -> list[str]:
        return [jid for jid, _ in self.r.zpopmin(self.key, n)]

    def _claim(self, cur: psycopg.Cursor[Any], ids: list[str], now: dt.datetime) -> list[Row]:
        if not ids:
            return []
        rows: list[Row] = cur.execute(_CLAIM, {"w": self.worker, "now": now, "ids": ids}).fetchall()
        cur.execute(_ASSIGN, {"w": self.worker, "now": now, "ids": [r[0] for r in rows],
                              "aids": [uuid.uuid4().hex for _ in rows],
                              "attempts": [r[2] for r in rows]})
        return rows

    def _complete(self, cur: psycopg.Cursor[Any], ids: list[str], now: dt.datetime) -> list[Row]:
        if not ids:
            return []
        rows: list[Row] = cur.execute(_COMPLETE, {"w": self.worker, "now": now, "ids": ids}
                                      ).fetchall()
        cur.execute(_END, {"now": now, "ids": ids})
        return rows

    def _events(self, cur: psycopg.Cursor[Any], done: Sequence[Row], claimed: Sequence[Row],
                now: dt.datetime) -> None:
        ev = ([(r, "completed", "completed") for r in done] + [(r, "assigned", "assigned")
                                                               for r in claimed]
              + [(r, "started", "running") for r in claimed])
        if ev:
            cur.execute(_EVENTS, {"w": self.worker, "now": now, "ids": [r[0] for r, _, _ in ev],
                                  "wfs": [r[1] for r, _, _ in ev], "events": [e for _, e, _ in ev],
                                  "statuses": [s for _, _, s in ev],
                                  "attempts": [r[2] for r, _, _ in ev]})

    def step(self, done: list[str], claim: int) -> list[str]:
        """Complete ``done`` and claim up to ``claim`` next: ONE transaction; return the claimed."""
        ids = self._pop(claim) if claim else []
        now = dt.datetime.now(dt.UTC)
        with self.conn.transaction(), self.conn.cursor() as cur:
            finished = self._complete(cur, done, now)
            claimed = self._claim(cur, ids, now)
            self._events(cur, finished, claimed, now)
        assert len(finished) == len(done), (len(finished), len(done))
        if finished or claimed:
            pipe = self.r.pipeline(transaction=False)
            for r in (*finished, *claimed):
                pipe.set(f"{self.key}:job:{r[0]}", r[3])
            pipe.execute()
        return [r[0] for r in claimed]


def drain_one(floor: Floor, n: int) -> int:
    """One commit per job: claim the first, then complete-the-previous-and-claim-the-next."""
    running = floor.step([], 1)
    done = 0
    while running and done < n:
        running = floor.step(running, 1 if done + 1 < n else 0)
        done += 1
    return done


def drain_batched(floor: Floor, n: int, batch: int = 100) -> int:
    """One commit per batch of claims and one per batch of completions."""
    done = 0
    while done < n:
        running = floor.step([], min(batch, n - done))
        if not running:
            break
        floor.step(running, 0)
        done += len(running)
    return done


def drain_fused_batched(floor: Floor, n: int, batch: int = 100) -> int:
    """One commit per batch: complete the batch in hand and claim the next in one transaction."""
    running = floor.step([], min(batch, n))
    done = 0
    while running:
        done += len(running)
        running = floor.step(running, min(batch, n - done))
    return done


@contextlib.contextmanager
def floor_worker(bench: harness.Bench, *, synchronous_commit: str = "on") -> Iterator[Floor]:
    """A hand-written worker on its own toolkit schema (created by a StateManager), removed after.

    ``synchronous_commit="off"``: its session commits with ``synchronous_commit = off``."""
    with bench.state_manager("floor") as sm:
        worker = sm.register_worker("bench-floor").id
        floor = Floor(bench, sm.settings.schema, worker, synchronous_commit=synchronous_commit)
        try:
            yield floor
        finally:
            floor.close()


def timed(fn: Any, *args: Any) -> float:
    """Seconds of ``fn(*args)``."""
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started

