"""The command line: ``python -m toolkit`` (also installed as ``toolkit``).

Exit codes scripts can rely on: 0 success, 1 a check failed (``check`` found a
disagreement, ``demo`` found a lost write), 2 bad usage or configuration,
3 a server could not be reached.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from toolkit import config, errors

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toolkit", description=(
        "Look inside, and recover, the live state of a workflow orchestrator's coordinator. "
        "URLs come from --database-url/--redis-url or DATABASE_URL/REDIS_URL."))
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, *, embedded: bool = False) -> None:
        sp.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
        sp.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL)")
        if not embedded:
            sp.add_argument("--namespace", default="wf", help="Redis key namespace (default: wf)")
            sp.add_argument("--schema", default="public", help="PostgreSQL schema (default: public)")

    demo = sub.add_parser("demo", help="the crash-and-rebuild scenario, end to end",
                          description="Kill a busy coordinator with SIGKILL, rebuild, prove nothing "
                          "was lost. Runs on the embedded stack unless URLs are given.")
    common(demo, embedded=True)
    demo.add_argument("--workflows", type=int, default=12)
    demo.add_argument("--jobs", type=int, default=20, help="jobs per workflow")
    demo.add_argument("--workers", type=int, default=4)
    demo.add_argument("--run-seconds", type=float, default=2.0,
                      help="how long the coordinator works before it is killed")

    up = sub.add_parser("up", help="start the embedded PostgreSQL and Redis and print their URLs")
    up.add_argument("--data-dir", help="keep PostgreSQL data here (default: throwaway)")

    check = sub.add_parser("check", help="consistency report; exit 1 on any disagreement",
                           description="Compare memory and Redis with PostgreSQL. A Redis that "
                           "may evict keys (maxmemory-policy other than noeviction) is named in "
                           "a warning line; it is a finding, not a disagreement (exit 0).")
    common(check)
    check.add_argument("--repair", action="store_true", help="also make memory and Redis agree")
    check.add_argument("--format", choices=("table", "csv", "json"), default="table")

    from toolkit.inspection import frames

    ins = sub.add_parser("inspect", help="print one frame of the live state")
    ins.add_argument("what", choices=sorted(frames.CLI_FRAMES))
    common(ins)
    ins.add_argument("--format", choices=("table", "csv", "json"), default="table")
    ins.add_argument("--workflow-id", help="jobs of this workflow only")
    ins.add_argument("--status", help="jobs with this status only")
    ins.add_argument("--limit", type=int, default=None, help="at most this many rows (table only)")
    _insight_parsers(sub, common)
    return p


def _insight_parsers(sub: Any, common: Any) -> None:
    ex = sub.add_parser("explain", help="why is this job where it is? (exit 1: no such job)")
    ex.add_argument("job_id")
    common(ex)
    ex.add_argument("--snapshot", metavar="DIR", help="read a snapshot folder instead of the servers")

    snap = sub.add_parser("snapshot", help="write every frame to a folder of Parquet files")
    snap.add_argument("dir")
    common(snap)
    snap.add_argument("--events-since", metavar="AGE",
                      help="keep only events younger than AGE (30d, 12h, 15m, 90s; default all)")

    met = sub.add_parser("metrics", help="counters, queues, workers and jobs as metrics")
    common(met)
    met.add_argument("--format", choices=("prometheus", "table", "csv", "json"), default="table")

    srv = sub.add_parser("serve-metrics", help="serve GET /metrics (Prometheus) over HTTP")
    common(srv)
    srv.add_argument("--port", type=int, default=9464)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")

    pur = sub.add_parser("purge", help="remove old finished jobs, their assignments and events")
    common(pur)
    pur.add_argument("--older-than", required=True, metavar="AGE", help="30d, 12h, 15m, 90s")
    pur.add_argument("--statuses", default="completed,cancelled",
                     help="comma-separated: completed, cancelled, failed (default completed,cancelled)")
    pur.add_argument("--dry-run", action="store_true", help="count, remove nothing")


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(field: str, text: str) -> float:
    """Seconds in ``text`` such as ``30d``, ``12h``, ``15m``, ``90s`` or ``1.5h``.

    Raises
    ------
    ValidationError
        Anything else (no unit, a negative or empty value, an unknown unit).
    """
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise errors.ValidationError(field, text, "must be a number and a unit: 30d, 12h, 15m or 90s")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _say(text: str) -> None:
    print(text, flush=True)


def _emit(frame: Any, fmt: str, limit: int | None = None) -> None:
    if fmt == "csv":
        sys.stdout.write(frame.to_csv())
    elif fmt == "json":
        sys.stdout.write(frame.to_json(orient="table", date_format="iso", index=True) + "\n")
    else:
        import pandas as pd

        shown = frame if limit is None else frame.head(limit)
        with pd.option_context("display.width", 160, "display.max_columns", 30,
                               "display.max_colwidth", 40):
            print(shown.to_string() if len(shown) else "(no rows)")


def cmd_demo(args: argparse.Namespace) -> int:
    from toolkit import scenarios

    _say("toolkit demo: a coordinator crashes mid-work and a new one rebuilds from PostgreSQL.\n")
    began = time.perf_counter()
    with scenarios.target(args.database_url, args.redis_url) as t:
        where = "the embedded stack" if t.stack else "the servers in DATABASE_URL / REDIS_URL"
        _say(f"PostgreSQL {config.host_port(t.database_url)} and Redis "
             f"{config.host_port(t.redis_url)} ({where}) are up.\n")
        result = scenarios.coordinator_crash(
            t, workflows=args.workflows, jobs_per_workflow=args.jobs, workers=args.workers,
            run_seconds=args.run_seconds, say=_say)
    _say("\nJobs per status, right after the rebuild and after the new workers drained the queue:")
    both = result.before.rename(columns={"jobs": "after rebuild"})
    both["after drain"] = result.after["jobs"]
    _emit(both, "table")
    _say("")
    _say(str(result))
    _say(f"\n{result.verdict}: recovered in {result.timings['recovery (connect + rebuild)']:.2f}s, "
         f"{result.details['acknowledged_writes']} acknowledged writes checked "
         f"(whole demo {time.perf_counter() - began:.1f}s).")
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED


def cmd_up(args: argparse.Namespace) -> int:
    from toolkit.local_stack import LocalStack

    with LocalStack(args.data_dir) as stack:
        _say(f"DATABASE_URL={stack.database_url}")
        _say(f"REDIS_URL={stack.redis_url}")
        _say("# export both, then run scripts or notebooks against them; Ctrl-C stops the servers")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            _say("stopping")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from toolkit.state import init_state_manager

    # No rebuild: a rebuild would reconcile Redis and hide what check is asked to find.
    with init_state_manager(args.database_url, args.redis_url, namespace=args.namespace,
                            schema=args.schema, rebuild=False) as sm:
        report = sm.repair() if args.repair else sm.check_consistency()
    if args.format != "table":  # the table's last lines carry them; keep CSV/JSON parseable
        for warning in report.warnings:
            print(f"toolkit: warning: {warning}", file=sys.stderr)
    if args.format != "table" or not report.ok:
        _emit(report.to_frame().set_index(["entity", "id"]), args.format)
    if args.format == "table":
        _say(str(report) + (" (repaired)" if args.repair and not report.ok else ""))
    return EXIT_OK if report.ok or args.repair else EXIT_CHECK_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    from toolkit.inspection.inspector import Inspector

    with Inspector(args.database_url, args.redis_url, namespace=args.namespace,
                   schema=args.schema) as ins:
        if args.what == "jobs":
            frame = ins.jobs(workflow_id=args.workflow_id, status=args.status)
        else:
            frame = getattr(ins, args.what)()
    _emit(frame, args.format, args.limit)
    return EXIT_OK


def _inspector(args: argparse.Namespace) -> Any:
    from toolkit.inspection.inspector import Inspector

    return Inspector(args.database_url, args.redis_url, namespace=args.namespace, schema=args.schema)


def cmd_explain(args: argparse.Namespace) -> int:
    from toolkit.inspection.inspector import Inspector

    with (Inspector.from_snapshot(args.snapshot) if args.snapshot else _inspector(args)) as ins:
        _say(str(ins.explain(args.job_id)))
    return EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    import pandas as pd

    since = None
    if args.events_since:
        age = parse_duration("events_since", args.events_since)
        since = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(seconds=age)).to_pydatetime()
    with _inspector(args) as ins:
        path = ins.snapshot(args.dir, events_since=since)
    import json

    rows = json.loads((path / "manifest.json").read_text())["rows"]
    _say(f"snapshot written to {path}: " + ", ".join(f"{k} {v}" for k, v in rows.items()))
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    from toolkit.inspection import prometheus

    with _inspector(args) as ins:
        if args.format == "prometheus":
            sys.stdout.write(prometheus.render(ins))
        else:
            _emit(ins.metrics(), args.format)
    return EXIT_OK


def cmd_serve_metrics(args: argparse.Namespace) -> int:
    from toolkit.inspection import prometheus

    with _inspector(args) as ins:
        server = prometheus.make_server(ins, args.host, args.port)
        host, port = server.server_address[:2]
        _say(f"serving Prometheus metrics on http://{host!s}:{port}/metrics (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            _say("stopping")
        finally:
            server.server_close()
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    from toolkit.state import init_state_manager

    age = parse_duration("older_than", args.older_than)
    statuses = [s.strip() for s in args.statuses.split(",") if s.strip()]
    with init_state_manager(args.database_url, args.redis_url, namespace=args.namespace,
                            schema=args.schema, rebuild=False) as sm:
        n = sm.purge(age, statuses=statuses, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    _say(f"{verb} {n} job(s) finished more than {args.older_than} ago with status "
         f"{', '.join(statuses)}")
    return EXIT_OK


COMMANDS = {"demo": cmd_demo, "up": cmd_up, "check": cmd_check, "inspect": cmd_inspect,
            "explain": cmd_explain, "snapshot": cmd_snapshot, "metrics": cmd_metrics,
            "serve-metrics": cmd_serve_metrics, "purge": cmd_purge}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (errors.ConfigurationError, errors.ValidationError) as exc:
        print(f"toolkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.StorageUnavailable as exc:
        print(f"toolkit: unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except errors.ToolkitError as exc:
        print(f"toolkit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        return 130
