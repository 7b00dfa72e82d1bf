"""The commands that run servers, check, repair, purge and snapshot.

``check`` (without ``--repair``), ``purge --dry-run``, ``snapshot`` and
``serve-metrics`` read only. ``check --repair`` and ``purge`` write, and even
they refuse a schema without toolkit tables rather than create one.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from toolkit import config
from toolkit.cli import parser
from toolkit.cli.output import emit, say
from toolkit.cli.read import opened


def _add_demo_and_up(sub: Any, common: Callable[..., None]) -> None:
    demo = sub.add_parser("demo", help="the crash-and-rebuild scenario, end to end",
                          description="Kill a busy coordinator with SIGKILL, rebuild, prove nothing "
                          "was lost. Runs on the embedded stack unless URLs are given.")
    common(demo, embedded=True)
    demo.add_argument("--workflows", type=int, default=12)
    demo.add_argument("--jobs", type=int, default=20, help="jobs per workflow")
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--kill-at", type=float, default=0.5, metavar="FRACTION",
                      help="kill the coordinator once this fraction of the jobs is acknowledged "
                      "completed and a job is in flight (default 0.5: about half the work)")
    demo.add_argument("--job-seconds", type=float, default=0.1, help="seconds per job (default 0.1)")

    up = sub.add_parser("up", help="start the embedded PostgreSQL and Redis and print their URLs")
    up.add_argument("--data-dir", help="keep PostgreSQL data here (default: throwaway)")


def add_commands(sub: Any, common: Callable[..., None]) -> None:
    """Add demo, up, check, snapshot, serve-metrics and purge to the subparsers ``sub``."""
    _add_demo_and_up(sub, common)

    check = sub.add_parser("check", help="consistency report, reads only; exit 1 on any disagreement",
                           description="Compare Redis with PostgreSQL (reads only). A Redis that "
                           "may evict keys (maxmemory-policy other than noeviction) is named in "
                           "a warning line; it is a finding, not a disagreement (exit 0). A "
                           "PostgreSQL crash under synchronous_commit=off since the last rebuild "
                           "is a warning that exits 1: --repair runs the full rebuild.")
    common(check)
    check.add_argument("--repair", action="store_true",
                       help="also make memory and Redis agree (writes; the schema must exist)")
    check.add_argument("--format", choices=parser.FORMATS, default="table")

    snap = sub.add_parser("snapshot", help="write every frame to a folder of Parquet files")
    snap.add_argument("dir")
    common(snap)
    snap.add_argument("--events-since", metavar="AGE",
                      help="keep only events younger than AGE (30d, 12h, 15m, 90s; default all)")
    snap.add_argument("--force", action="store_true",
                      help="write into DIR even when it is not empty (default: refuse)")
    parser.unmask_option(snap)

    srv = sub.add_parser("serve-metrics", help="serve GET /metrics (Prometheus) over HTTP")
    common(srv)
    srv.add_argument("--port", type=int, default=9464)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")

    pur = sub.add_parser("purge", help="remove old finished jobs of finished (completed or "
                         "cancelled) workflows, their assignments and events")
    common(pur)
    pur.add_argument("--older-than", required=True, metavar="AGE", help="30d, 12h, 15m, 90s")
    pur.add_argument("--statuses", default="completed,cancelled",
                     help="comma-separated: completed, cancelled, failed (default completed,cancelled)")
    pur.add_argument("--dry-run", action="store_true", help="count, remove nothing (reads only)")


def cmd_demo(args: argparse.Namespace) -> int:
    from toolkit import scenarios

    say("toolkit demo: a coordinator crashes mid-work and a new one rebuilds from PostgreSQL.\n")
    began = time.perf_counter()
    with scenarios.target(args.database_url, args.redis_url) as t:
        where = "the embedded stack" if t.stack else "the servers in DATABASE_URL / REDIS_URL"
        say(f"PostgreSQL {config.host_port(t.database_url)} and Redis "
            f"{config.host_port(t.redis_url)} ({where}) are up.\n")
        result = scenarios.coordinator_crash(
            t, workflows=args.workflows, jobs_per_workflow=args.jobs, workers=args.workers,
            kill_at=args.kill_at, job_seconds=args.job_seconds, say=say)
    say("\nJobs per status, right after the rebuild and after the new workers drained the queue:")
    both = result.before.rename(columns={"jobs": "after rebuild"})
    both["after drain"] = result.after["jobs"]
    emit(both, "table")
    say("")
    say(str(result))
    say("\n" + _demo_summary(result, time.perf_counter() - began))
    return 0 if result.ok else 1


def _demo_summary(result: Any, took: float) -> str:
    """The demo's last words, for someone who has never seen it: what died, what came back."""
    d = result.details
    lost = "none was lost" if result.ok else "SEE THE FAILED CHECKS ABOVE"
    return (
        f"{result.verdict}: when the coordinator was killed, {d['in_flight_at_kill']} jobs were in "
        f"flight on its workers.\n"
        f"The new coordinator rebuilt its state from PostgreSQL in "
        f"{result.timings['recovery (connect + rebuild)']:.2f}s and found {d['found_in_flight']} jobs "
        f"in flight; it reclaimed {d['reclaimed']} once their workers' heartbeats expired, and "
        f"{d['reclaimed_completed_once']} of them then completed exactly once "
        f"({d['reclaimed_failed_by_attempts']} failed after using up their attempts).\n"
        f"{d['acknowledged_writes']} acknowledged writes were checked against PostgreSQL: {lost}. "
        f"(whole demo {took:.1f}s)")


def cmd_up(args: argparse.Namespace) -> int:
    from toolkit.local_stack import LocalStack

    with LocalStack(args.data_dir) as stack:
        say(f"DATABASE_URL={stack.database_url}")
        say(f"REDIS_URL={stack.redis_url}")
        say("# export both, then run scripts or notebooks against them; Ctrl-C stops the servers")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            say("stopping")
    return 0


def _manager(args: argparse.Namespace) -> Any:
    """A StateManager for a write command, after checking (read-only) that the schema exists."""
    from toolkit.state import init_state_manager

    with opened(args):
        pass
    # No rebuild: a rebuild would reconcile Redis and hide what check is asked to find.
    return init_state_manager(args.database_url, args.redis_url, namespace=args.namespace,
                              schema=args.schema, rebuild=False)


def cmd_check(args: argparse.Namespace) -> int:
    if args.repair:
        with _manager(args) as sm:
            report = sm.repair()
    else:
        with opened(args) as ins:
            report = ins.check_consistency()
    if args.format != "table":  # the table's last lines carry them; keep CSV/JSON parseable
        for warning in report.warnings:
            print(f"toolkit: warning: {warning}", file=sys.stderr)
    if args.format != "table" or not report.ok:
        emit(report.to_frame().set_index(["entity", "id"]), args.format)
    if args.format == "table":
        say(str(report) + (" (repaired)" if args.repair and not report.ok else ""))
    return 0 if (report.ok and not report.postgres_crashed) or args.repair else 1


def cmd_snapshot(args: argparse.Namespace) -> int:
    import json

    import pandas as pd

    since = None
    if args.events_since:
        age = parser.parse_duration("events_since", args.events_since)
        since = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=age)).to_pydatetime()
    with opened(args) as ins:
        path = ins.snapshot(args.dir, events_since=since, overwrite=args.force)
    rows = json.loads((path / "manifest.json").read_text())["rows"]
    say(f"snapshot written to {path}: " + ", ".join(f"{k} {v}" for k, v in rows.items()))
    return 0


def cmd_serve_metrics(args: argparse.Namespace) -> int:
    from toolkit.inspection import prometheus

    with opened(args) as ins:
        server = prometheus.make_server(ins, args.host, args.port)
        host, port = server.server_address[:2]
        say(f"serving Prometheus metrics on http://{host!s}:{port}/metrics (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            say("stopping")
        finally:
            server.server_close()
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    age = parser.parse_duration("older_than", args.older_than)
    statuses = [s.strip() for s in args.statuses.split(",") if s.strip()]
    if args.dry_run:
        with opened(args) as ins:
            n = ins.purgeable(age, statuses)
    else:
        with _manager(args) as sm:
            n = sm.purge(age, statuses=statuses)
    verb = "would remove" if args.dry_run else "removed"
    say(f"{verb} {n} job(s) finished more than {args.older_than} ago with status "
        f"{', '.join(statuses)}")
    return 0


COMMANDS = {"demo": cmd_demo, "up": cmd_up, "check": cmd_check, "snapshot": cmd_snapshot,
            "serve-metrics": cmd_serve_metrics, "purge": cmd_purge}
