"""The read commands: frames, explanations and analytics. None of them writes anything.

Each opens a read-only :class:`~toolkit.Inspector` (or a snapshot folder), checks
first that the schema holds toolkit tables (else exit 4, nothing created) and
prints on stderr when the namespace or the schema is empty.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from toolkit import errors
from toolkit.cli import parser
from toolkit.cli.output import emit_args, filter_status, say, warn
from toolkit.inspection import frames

SNAPSHOT_HELP = "read a snapshot folder instead of the servers"


@contextlib.contextmanager
def opened(args: argparse.Namespace) -> Iterator[Any]:
    """The Inspector of a read command, its target checked and its notes printed."""
    from toolkit.inspection.inspector import Inspector

    unmask = bool(getattr(args, "unmask", False))
    if getattr(args, "snapshot", None):
        with Inspector.from_snapshot(args.snapshot, unmask=unmask) as offline:
            yield offline
        return
    with Inspector(args.database_url, args.redis_url, namespace=args.namespace,
                   schema=args.schema, unmask=unmask) as ins:
        try:
            notes = ins.check_target()
        except errors.SetupError:
            raise
        except errors.StorageUnavailable as exc:  # the Redis frames may still answer: let them
            logging.getLogger(__name__).info("target not checked: %s", exc)
            notes = []
        for note in notes:
            warn(note)
        yield ins


def add_commands(sub: Any, common: Callable[..., None]) -> None:
    """Add the read commands to the subparsers ``sub``."""
    ins = sub.add_parser("inspect", help="print one frame of the live state")
    ins.add_argument("what", choices=sorted(frames.CLI_FRAMES))
    common(ins)
    parser.output_options(ins)
    ins.add_argument("--workflow-id", help="jobs of this workflow only")
    ins.add_argument("--status", help="rows with this status only (workflows, jobs, workers, "
                     "assignments; an error for a frame without a status column)")
    ins.add_argument("--snapshot", metavar="DIR", help=SNAPSHOT_HELP)
    parser.unmask_option(ins)
    _jobs_parser(sub, common)

    ex = sub.add_parser("explain", help="why is this job where it is? (exit 1: no such job)")
    ex.add_argument("job_id")
    common(ex)
    ex.add_argument("--snapshot", metavar="DIR", help=SNAPSHOT_HELP)
    parser.unmask_option(ex)

    met = sub.add_parser("metrics", help="counters, queues, workers and jobs as metrics")
    common(met)
    parser.output_options(met, ("prometheus", *parser.FORMATS))
    _analytics_parsers(sub, common)


def _analytics_parsers(sub: Any, common: Callable[..., None]) -> None:
    def frame_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        common(sp)
        parser.output_options(sp)
        sp.add_argument("--snapshot", metavar="DIR", help=SNAPSHOT_HELP)
        parser.unmask_option(sp)
        return sp

    ev = frame_command("events", "the job event log, oldest first (which jobs failed, and why)")
    ev.add_argument("--type", metavar="EVENT", help="only this event: " + ", ".join(frames.EVENTS))
    ev.add_argument("--since", metavar="WHEN", help="an age (10m, 2h, 1d) or an ISO time")
    for flag in ("--job-id", "--workflow-id", "--worker-id"):
        ev.add_argument(flag)
    tl = frame_command("timeline", "one job's events with the time spent in each state")
    tl.add_argument("job_id")
    wt = frame_command("wait-times", "queued-to-assigned waits: count, p50, p90, p99, max")
    wt.add_argument("--by", choices=("priority", "queue"), default="priority")
    wt.add_argument("--since", metavar="WHEN", help="an age (10m, 2h, 1d) or an ISO time")
    frame_command("heartbeat-gaps", "per worker: gaps between heartbeats and a suggested TTL")
    ms = frame_command("metric-series", "counters over time, one column per metric")
    ms.add_argument("--names", metavar="A,B", help="these counters only (default: all)")
    ms.add_argument("--freq", default="1min", help="bin width, a whole number of minutes "
                    "(1min, 5min, 1h, 1D; default 1min)")
    ms.add_argument("--since", metavar="WHEN", help="an age (10m, 2h, 1d) or an ISO time")
    ms.add_argument("--until", metavar="WHEN", help="an age (10m, 2h, 1d) or an ISO time")


def _jobs_parser(sub: Any, common: Callable[..., None]) -> None:
    jobs = sub.add_parser(
        "jobs", help="find jobs: by workflow, status and payload (JSONB containment)",
        description="The jobs frame, searched. --payload keeps the jobs whose payload contains "
        "the JSON object given (PostgreSQL @>, served by a GIN index); --limit caps the rows "
        "read, oldest first, and a capped result says so on stderr. Values of sensitive keys "
        "(password, token, api_key, ... and $TOOLKIT_SENSITIVE_KEYS) print as *** unless "
        "--unmask. Exit 2 for a payload that is not a JSON object.")
    common(jobs)
    parser.output_options(jobs)
    jobs.add_argument("--workflow-id", help="jobs of this workflow only")
    jobs.add_argument("--status", help="jobs with this status only")
    jobs.add_argument("--payload", metavar="JSON",
                      help="""a JSON object the payload contains: '{"customer": {"plan": "pro"}}'""")
    jobs.add_argument("--payload-column", action="append", metavar="NAME=PATH", default=[],
                      help="add column NAME from the payload's dotted PATH (customer.plan, "
                      "tags.0); repeat for more")
    jobs.add_argument("--snapshot", metavar="DIR", help=SNAPSHOT_HELP)
    parser.unmask_option(jobs)


def _payload_arguments(args: argparse.Namespace) -> tuple[Any, dict[str, str]]:
    payload = None
    if args.payload is not None:
        try:
            payload = json.loads(args.payload)
        except ValueError as exc:
            raise errors.ValidationError("payload", args.payload, f"must be a JSON object: {exc}") \
                from None
    columns: dict[str, str] = {}
    for item in args.payload_column:
        name, sep, path = item.partition("=")
        if not sep:
            raise errors.ValidationError("payload_column", item, "must be NAME=PATH (plan=customer.plan)")
        columns[name.strip()] = path.strip()
    return payload, columns


def cmd_jobs(args: argparse.Namespace) -> int:
    payload, columns = _payload_arguments(args)
    cap = args.limit if args.limit else None
    quiet = logging.getLogger("toolkit.inspection.search")  # the note below says it instead
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with opened(args) as ins:
            frame = ins.jobs(workflow_id=args.workflow_id, status=args.status, payload=payload,
                             payload_columns=columns or None, limit=cap)
    finally:
        quiet.setLevel(level)
    if frame.attrs.get("capped"):
        warn(f"more than {cap} jobs match: showing the first {cap} (oldest); raise --limit or "
             "narrow the search")
    emit_args(frame, args)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    with opened(args) as ins:
        if args.what == "jobs":
            frame = ins.jobs(workflow_id=args.workflow_id, status=args.status)
        else:
            if args.workflow_id is not None:
                raise errors.ValidationError("workflow_id", args.workflow_id, "applies to jobs only")
            frame = filter_status(getattr(ins, args.what)(), args.what, args.status)
    emit_args(frame, args)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    with opened(args) as ins:
        say(str(ins.explain(args.job_id)))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from toolkit.inspection import prometheus

    with opened(args) as ins:
        if args.format == "prometheus":
            sys.stdout.write(prometheus.render(ins))
        else:
            emit_args(ins.metrics(), args)
    return 0


def _when(args: argparse.Namespace, field: str, now: pd.Timestamp) -> Any:
    return parser.parse_time(field, getattr(args, field, None), now.to_pydatetime())


def cmd_events(args: argparse.Namespace) -> int:
    if args.type is not None and args.type not in frames.EVENTS:
        raise errors.ValidationError("type", args.type, f"must be one of {', '.join(frames.EVENTS)}")
    with opened(args) as ins:
        frame = ins.events(since=_when(args, "since", ins._now()), job_id=args.job_id,
                           workflow_id=args.workflow_id, worker_id=args.worker_id)
    if args.type is not None:
        frame = frame[frame["event"] == args.type]
    emit_args(frame, args)
    return 0


def cmd_timeline(args: argparse.Namespace) -> int:
    with opened(args) as ins:
        emit_args(ins.timeline(args.job_id), args)
    return 0


def cmd_wait_times(args: argparse.Namespace) -> int:
    with opened(args) as ins:
        emit_args(ins.wait_times(args.by, since=_when(args, "since", ins._now())), args)
    return 0


def cmd_heartbeat_gaps(args: argparse.Namespace) -> int:
    with opened(args) as ins:
        emit_args(ins.heartbeat_gaps(), args)
    return 0


def cmd_metric_series(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
    with opened(args) as ins:
        now = ins._now()
        frame = ins.metric_series(names, freq=args.freq, since=_when(args, "since", now),
                                  until=_when(args, "until", now))
    emit_args(frame, args)
    return 0


COMMANDS = {"inspect": cmd_inspect, "jobs": cmd_jobs, "explain": cmd_explain, "metrics": cmd_metrics,
            "events": cmd_events, "timeline": cmd_timeline, "wait-times": cmd_wait_times,
            "heartbeat-gaps": cmd_heartbeat_gaps, "metric-series": cmd_metric_series}
