"""The bulk operator commands: ``requeue``, ``cancel-jobs`` (plan, show, confirm, apply) and
``actions`` (the record of what was applied; reads only).

``--dry-run`` plans over a read-only connection and writes nothing. Without it, the
plan is shown and applied after a confirmation on a terminal (``--yes`` skips it; off
a terminal, ``--yes`` is required). Exit codes: 0 applied (jobs changed by someone
else since the plan are listed as skipped) or nothing to do; 1 the confirmation was
declined (nothing written); 2 bad usage (a filter, no filter without ``--all``, no
``--yes`` off a terminal); 3 and 4 as for every command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from toolkit import config, errors
from toolkit.cli import parser
from toolkit.cli.output import emit, emit_args, records, say
from toolkit.cli.read import opened

EPILOG = """\
filters combine with AND; no filter is refused unless --all is given.
--name is a glob (* and ? only; % and _ match themselves).
exit codes: 0 applied or nothing to do, 1 confirmation declined, 2 bad usage
(or no --yes off a terminal), 3 a server unreachable, 4 setup.
"""


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workflow-id", help="jobs of this workflow")
    p.add_argument("--status", help="comma-separated job statuses")
    p.add_argument("--queue", help="jobs of this queue")
    p.add_argument("--name", metavar="GLOB", help="job names matching this glob (* and ?)")
    p.add_argument("--worker-id", help="jobs last held by this worker")
    p.add_argument("--error", metavar="TEXT", help="jobs whose error contains TEXT (any case)")
    p.add_argument("--since", metavar="AGE", help="jobs changed within AGE (2h, 30m, 1d)")
    p.add_argument("--older-than", metavar="AGE", help="jobs unchanged for AGE or more")
    p.add_argument("--payload", metavar="JSON", help='jobs whose payload contains this JSON object, '
                   'e.g. \'{"customer": {"plan": "pro"}}\'')
    p.add_argument("--all", action="store_true", help="no filter: every job the verb may change")
    p.add_argument("--reason", help="why (recorded with the action and in each job's event)")
    p.add_argument("--actor", help="who (default: $USER)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, write nothing")
    p.add_argument("--yes", action="store_true", help="apply without asking")
    p.add_argument("--json", action="store_true", help="print the plan and the result as JSON")
    p.add_argument("--batch", type=int, default=1000, help="jobs per transaction (default 1000)")


def add_commands(sub: Any, common: Callable[..., None]) -> None:
    """Add requeue, cancel-jobs and actions to the subparsers ``sub``."""
    raw = argparse.RawDescriptionHelpFormatter
    req = sub.add_parser("requeue", help="plan, then re-queue failed jobs matching a filter",
                         description="Re-queue failed jobs (as enqueue does: a job out of "
                         "attempts gets one more). Each job is guarded by the version it had "
                         "in the plan.", epilog=EPILOG, formatter_class=raw)
    common(req)
    _filters(req)
    can = sub.add_parser("cancel-jobs", help="plan, then cancel jobs matching a filter",
                         description="Cancel pending, queued, assigned or running jobs. Each "
                         "job is guarded by the version it had in the plan.", epilog=EPILOG,
                         formatter_class=raw)
    common(can)
    _filters(can)
    act = sub.add_parser("actions", help="the bulk actions applied so far (reads only)")
    common(act)
    parser.output_options(act)
    parser.unmask_option(act)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The plan's keyword arguments from the command line (validated by the plan)."""
    payload = None
    if args.payload is not None:
        try:
            payload = json.loads(args.payload)
        except ValueError as exc:
            raise errors.ValidationError("payload", args.payload, f"is not JSON: {exc}") from None
    ages = {k: parser.parse_duration(k, getattr(args, k)) if getattr(args, k) else None
            for k in ("since", "older_than")}
    import os

    return {"workflow_id": args.workflow_id, "queue": args.queue, "name": args.name,
            "status": [s.strip() for s in args.status.split(",")] if args.status else None,
            "worker_id": args.worker_id, "error_contains": args.error, "payload": payload,
            "all": args.all, "reason": args.reason,
            "actor": args.actor or os.environ.get("USER") or None, **ages}


def _show_plan(plan: Any, as_json: bool) -> None:
    if as_json:
        say(json.dumps({"action_id": plan.id, "verb": plan.verb, "filter": plan.filter,
                        "planned": len(plan.frame),
                        "counts": records(plan.counts),
                        "jobs": records(plan.frame)}, ensure_ascii=False))
        return
    say(f"{plan.verb}: {len(plan.frame)} job(s) match {json.dumps(plan.filter)}")
    if len(plan.frame):
        emit(plan.counts, "table")
        emit(plan.frame[["workflow_id", "name", "status", "queue", "priority", "version"]], "table",
             limit=20)
        if len(plan.frame) > 20:
            say(f"... and {len(plan.frame) - 20} more")


def _confirmed(plan: Any, args: argparse.Namespace) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise errors.ValidationError("yes", None, "not a terminal: pass --yes to apply the plan")
    answer = input(f"Apply {plan.verb} to {len(plan.frame)} job(s)? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _run(verb: str, args: argparse.Namespace) -> int:
    from toolkit.cli.admin import _manager
    from toolkit.manager import planning

    options = _options(args)
    if args.dry_run:
        with opened(args):
            pass
        settings = config.load_settings(args.database_url, args.redis_url,
                                        namespace=args.namespace, schema=args.schema)
        _show_plan(planning.plan_read_only(settings, verb, **options), args.json)
        return 0
    with _manager(args) as sm:
        plan = sm.plan_action(verb, **options)
        _show_plan(plan, args.json)
        if not len(plan.frame):
            return 0
        if not _confirmed(plan, args):
            say("nothing applied")
            return 1
        result = sm.apply_action(plan, batch=args.batch, progress=None if sys.stderr.isatty() else False)
    if args.json:
        say(json.dumps({"action_id": result.action_id, "planned": result.planned,
                        "applied": result.applied, "already": result.already,
                        "skipped": result.skipped, "skipped_ids": list(result.skipped_ids)}))
    else:
        say(f"action {result.action_id}: {result.applied} applied, {result.skipped} skipped "
            "(changed since the plan)" + "".join(f"\n  skipped {i}" for i in result.skipped_ids))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    return _run("requeue", args)


def cmd_cancel_jobs(args: argparse.Namespace) -> int:
    return _run("cancel", args)


def cmd_actions(args: argparse.Namespace) -> int:
    with opened(args) as ins:
        emit_args(ins.actions(), args)
    return 0


COMMANDS = {"requeue": cmd_requeue, "cancel-jobs": cmd_cancel_jobs, "actions": cmd_actions}
