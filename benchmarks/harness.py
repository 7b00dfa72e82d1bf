"""The shared benchmark harness: targets, timing, data, results and the command line.

Every area script (``python -m benchmarks.<area>``) defines ``run(bench)`` and
calls :func:`main`. A case times the toolkit and its raw floor in the same
process, against the same servers, and records one JSON line with the
medians, the ratio and the goal. Results go to ``benchmarks/results/`` (one
``<run id>.jsonl`` file per run); ``python -m benchmarks.report`` prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

import toolkit
from toolkit import scenarios
from toolkit.tiers.redis import keys

RESULTS = Path(__file__).resolve().parent / "results"
RUN_ENV = "BENCH_RUN_ID"
JOB_COLUMNS = (
    "id", "workflow_id", "name", "status", "priority", "queue", "payload", "result", "error",
    "attempts", "max_attempts", "worker_id", "depends_on", "enqueue_seq", "created_at",
    "updated_at", "started_at", "finished_at", "version",
)
JOB_TYPES = (
    "text", "text", "text", "text", "integer", "text", "jsonb", "jsonb", "text", "integer",
    "integer", "text", "text[]", "bigint", "timestamptz", "timestamptz", "timestamptz",
    "timestamptz", "bigint",
)


# -- statistics -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stats:
    """A measured quantity: median, min and max over runs (p50/p99 for latencies)."""

    unit: str
    median: float
    min: float
    max: float
    runs: int
    p50: float | None = None
    p99: float | None = None

    def value(self, metric: str) -> float:
        """Return ``median``, ``p50`` or ``p99``."""
        found = getattr(self, metric)
        return float(found if found is not None else self.median)


def rate(count: int, seconds: Sequence[float], unit: str = "ops/s") -> Stats:
    """Per-run rates (``count`` items per run) summarised."""
    rates = [count / s for s in seconds if s > 0]
    return Stats(unit, statistics.median(rates), min(rates), max(rates), len(rates))


def duration(seconds: Sequence[float]) -> Stats:
    """Run times in seconds summarised."""
    return Stats("s", statistics.median(seconds), min(seconds), max(seconds), len(seconds))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, nearest rank."""
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def latency(samples: Sequence[float]) -> Stats:
    """Per-call latencies (seconds) as microseconds: p50, p99, min, max."""
    us = sorted(s * 1e6 for s in samples)
    p50 = percentile(us, 0.5)
    return Stats("us", p50, us[0], us[-1], len(us), p50=p50, p99=percentile(us, 0.99))


# -- timing ---------------------------------------------------------------------------------

def time_once(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def time_runs(fn: Callable[[], object], runs: int, *, setup: Callable[[], object] | None = None,
              warmup: int = 0) -> list[float]:
    """Seconds of ``runs`` calls of ``fn`` (``setup`` untimed before each)."""
    out: list[float] = []
    for i in range(warmup + runs):
        if setup is not None:
            setup()
        took = time_once(fn)
        if i >= warmup:
            out.append(took)
    return out


def sample_latency(op: Callable[[int], object], n: int, *,
                   setup: Callable[[int], object] | None = None, warmup: int = 50) -> list[float]:
    """Per-call seconds of ``op(i)`` for ``i`` in ``range(n)``; ``setup(i)`` is untimed."""
    clock = time.perf_counter
    out: list[float] = []
    for i in range(-warmup, n):
        k = i % n
        if setup is not None:
            setup(k)
        started = clock()
        op(k)
        took = clock() - started
        if i >= 0:
            out.append(took)
    return out


def paired_runs(toolkit_fn: Callable[[], object], floor_fn: Callable[[], object],
                runs: int) -> tuple[list[float], list[float]]:
    """Seconds of ``runs`` calls of each, interleaved so that load on a shared machine hits both."""
    tk: list[float] = []
    floor: list[float] = []
    for _ in range(runs):
        tk.append(time_once(toolkit_fn))
        floor.append(time_once(floor_fn))
    return tk, floor


# -- goals and results ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Goal:
    """``toolkit.metric / floor.metric`` (or the toolkit value alone) must be >= or <= ``value``."""

    op: str
    value: float
    metric: str = "median"
    absolute: bool = False

    def text(self) -> str:
        what = "value" if self.absolute else "ratio"
        metric = "" if self.metric == "median" else f" ({self.metric})"
        return f"{what}{metric} {self.op} {self.value:g}"

    def met(self, measured: float) -> bool:
        return measured >= self.value if self.op == ">=" else measured <= self.value


def at_least(value: float, metric: str = "median") -> Goal:
    return Goal(">=", value, metric)


def at_most(value: float, metric: str = "median") -> Goal:
    return Goal("<=", value, metric)


def absolute_max(value: float, metric: str = "median") -> Goal:
    return Goal("<=", value, metric, absolute=True)


def absolute_min(value: float, metric: str = "median") -> Goal:
    return Goal(">=", value, metric, absolute=True)


# -- the environment of a run -----------------------------------------------------------------

def _server_versions(t: scenarios.Target) -> dict[str, str]:
    with psycopg.connect(pg_dsn(t.database_url)) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    r = redis.Redis.from_url(t.redis_url)
    try:
        info = r.info("server")
    finally:
        r.close()
    return {"postgres": str(row[0]) if row else "?", "redis": str(info.get("redis_version"))}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine_facts() -> dict[str, Any]:
    """Facts that make a figure comparable: cores, CPU, OS, Python, toolkit."""
    return {"nproc": os.cpu_count(), "cpu": _cpu_model(), "os": platform.platform(),
            "python": platform.python_version(), "toolkit_version": toolkit.__version__}


def pg_dsn(url: str) -> str:
    """A libpq DSN from a SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclasses.dataclass
class Bench:
    """One target (servers) in one run: sizes, connections, and the results file."""

    target: scenarios.Target
    label: str
    quick: bool
    run_id: str
    facts: dict[str, Any]
    only: set[str] = dataclasses.field(default_factory=set)

    def n(self, full: int, quick: int) -> int:
        """The size of a case: ``full`` in a full run, ``quick`` with ``--quick``."""
        return quick if self.quick else full

    @property
    def runs(self) -> int:
        return 3 if self.quick else 5

    def wants(self, case: str) -> bool:
        return not self.only or any(case.startswith(o) for o in self.only)

    def redis(self) -> redis.Redis:
        """A raw redis-py client (hiredis, decoded strings), as the toolkit's own."""
        return redis.Redis.from_url(self.target.redis_url, decode_responses=True)

    def pg(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        """A raw psycopg connection."""
        return psycopg.connect(pg_dsn(self.target.database_url), autocommit=autocommit)

    @contextlib.contextmanager
    def state_manager(self, prefix: str, **kwargs: Any) -> Iterator[toolkit.StateManager]:
        """A StateManager on a fresh schema and namespace, both removed afterwards."""
        ns, schema = scenarios.fresh_names(f"bench_{prefix}")
        sm = toolkit.init_state_manager(self.target.database_url, self.target.redis_url,
                                        namespace=ns, schema=schema, **kwargs)
        try:
            yield sm
        finally:
            sm.close()
            self.drop(ns, schema)

    def wipe(self, ns: str) -> int:
        """Remove every Redis key of namespace ``ns`` (SCAN + UNLINK, never FLUSHDB)."""
        r = self.redis()
        try:
            return unlink_prefix(r, keys.namespace_pattern(ns))
        finally:
            r.close()

    def drop(self, ns: str, schema: str) -> None:
        """Remove a namespace's keys and drop its schema by name (never a database)."""
        self.wipe(ns)
        with self.pg() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    def record(self, area: str, case: str, n: int, tk: Stats, floor: Stats | None, goal: Goal,
               *, floor_name: str = "", note: str = "", extra: dict[str, Any] | None = None) -> None:
        """Append one case to the results file and print a one-line summary."""
        measured = tk.value(goal.metric)
        ratio = None if goal.absolute or floor is None else measured / floor.value(goal.metric)
        passed = goal.met(measured if ratio is None else ratio)
        line = {"run_id": self.run_id, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "target": self.label, "quick": self.quick, "area": area, "case": case, "n": n,
                "toolkit": dataclasses.asdict(tk),
                "floor": dataclasses.asdict(floor) if floor else None, "floor_name": floor_name,
                "metric": goal.metric, "ratio": ratio, "goal": goal.text(), "pass": passed,
                "note": note, "extra": extra or {}, **self.facts}
        RESULTS.mkdir(exist_ok=True)
        with (RESULTS / f"{self.run_id}.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        shown = f"ratio {ratio:.2f}" if ratio is not None else f"{measured:.3g} {tk.unit}"
        print(f"  [{self.label}] {case}: toolkit {measured:,.4g} {tk.unit} | {shown} | "
              f"{goal.text()} -> {'pass' if passed else 'MISS'}", flush=True)


# -- data -------------------------------------------------------------------------------------

def job_specs(n: int) -> list[dict[str, Any]]:
    """Job specs for ``create_workflow``: names, five priorities, a small JSON payload."""
    return [{"name": f"j{i}", "priority": i % 5, "payload": {"i": i, "kind": "bench"}}
            for i in range(n)]


def job_rows(workflow_id: str, n: int, *, status: str = "queued", seq0: int = 0,
             now: dt.datetime | None = None) -> list[tuple[Any, ...]]:
    """Raw job rows (in :data:`JOB_COLUMNS` order) as the toolkit would store them."""
    now = now or dt.datetime.now(dt.UTC)
    final = status in ("completed", "cancelled")
    return [(uuid.uuid4().hex, workflow_id, f"j{i}", status, i % 5, "default",
             {"i": i, "kind": "bench"}, None, None, 0, 3, None, [],
             None if final else seq0 + i, now, now, now if final else None,
             now if final else None, 1) for i in range(n)]


def insert_workflows(conn: psycopg.Connection[Any], schema: str, ids: Sequence[str]) -> None:
    """Insert bare workflow rows (the parents raw job rows need)."""
    now = dt.datetime.now(dt.UTC)
    stmt = sql.SQL("INSERT INTO {} (id, name, status, metadata, created_at, updated_at, version) "
                   "VALUES (%s, %s, 'pending', '{{}}', %s, %s, 1)").format(
        sql.Identifier(schema, "workflows"))
    with conn.cursor() as cur:
        cur.executemany(stmt, [(i, f"wf-{i}", now, now) for i in ids])


def copy_jobs_binary(conn: psycopg.Connection[Any], schema: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """``COPY jobs FROM STDIN (FORMAT BINARY)``: the floor of a bulk insert."""
    stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(schema, "jobs"), sql.SQL(", ").join(map(sql.Identifier, JOB_COLUMNS)))
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        copy.set_types(list(JOB_TYPES))
        for row in rows:
            copy.write_row(row)


def add_raw_jobs(bench: Bench, schema: str, n: int, *, status: str, batch: int = 1000,
                 seq0: int = 0) -> None:
    """Bulk-load ``n`` jobs in workflows of ``batch`` (fast setup for read-side cases)."""
    with bench.pg(autocommit=False) as conn:
        for start in range(0, n, batch):
            wf = uuid.uuid4().hex
            insert_workflows(conn, schema, [wf])
            copy_jobs_binary(conn, schema, job_rows(wf, min(batch, n - start), status=status,
                                                    seq0=seq0 + start))
        conn.commit()
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, "jobs")))


def unlink_prefix(r: redis.Redis, pattern: str) -> int:
    """UNLINK every key matching ``pattern`` (SCAN, never KEYS or FLUSH)."""
    names = list(r.scan_iter(match=pattern, count=5000))
    for i in range(0, len(names), 5000):
        r.unlink(*names[i:i + 5000])
    return len(names)


# -- the command line -------------------------------------------------------------------------

Area = Callable[[Bench], None]


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N (every case in minutes)")
    p.add_argument("--target", choices=("auto", "embedded", "loopback", "both"), default="auto",
                   help="auto: DATABASE_URL/REDIS_URL when set, else the embedded stack")
    p.add_argument("--only", nargs="*", default=[], help="run only cases whose name starts so")
    return p


def _targets(choice: str) -> list[str]:
    env = bool(os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL"))
    if choice == "auto":
        return ["loopback" if env else "embedded"]
    if choice == "both":
        return ["loopback", "embedded"] if env else ["embedded"]
    if choice == "loopback" and not env:  # scenarios.target() would start the embedded stack
        raise SystemExit("--target loopback needs DATABASE_URL and REDIS_URL (unset: the results "
                         "would be the embedded stack's under the loopback label)")
    return [choice]


@contextlib.contextmanager
def open_target(label: str) -> Iterator[scenarios.Target]:
    if label == "loopback":
        with scenarios.target() as t:
            yield t
        return
    from toolkit.local_stack import LocalStack

    with LocalStack() as stack:
        yield scenarios.Target(stack.database_url, stack.redis_url, stack)


def run_areas(areas: Sequence[tuple[str, Area]], args: argparse.Namespace) -> str:
    """Run ``areas`` on every chosen target; return the run id."""
    run_id = os.environ.get(RUN_ENV) or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for label in _targets(args.target):
        with open_target(label) as t:
            facts = {**machine_facts(), **_server_versions(t)}
            bench = Bench(t, label, args.quick, run_id, facts, set(args.only))
            print(f"== target {label} (PostgreSQL {facts['postgres']}, Redis {facts['redis']}, "
                  f"{'quick' if args.quick else 'full'} N)", flush=True)
            for name, area in areas:
                started = time.perf_counter()
                print(f"-- {name}", flush=True)
                area(bench)
                print(f"   ({time.perf_counter() - started:.1f}s)", flush=True)
    return run_id


def main(area: Area, doc: str | None) -> None:
    """The command line of one area script."""
    args = parser(doc).parse_args()
    name = Path(sys.argv[0]).stem
    run_id = run_areas([(name, area)], args)
    from benchmarks import report

    if args.only and not (report.RESULTS / f"{run_id}.jsonl").is_file():
        sys.exit(f"no case of {name} starts with {' or '.join(args.only)} (case names: see --help)")
    print(report.render(report.load(run_id)))
