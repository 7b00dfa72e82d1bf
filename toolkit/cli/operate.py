"""The commands that change how work flows: ``pause`` and ``resume`` a queue, ``edit`` a job.

They write (through a StateManager, never the Inspector), ask for confirmation
on a terminal unless ``--yes``, and check their input before any server is
contacted. A schema without toolkit tables is refused, never created.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from toolkit import errors, validate
from toolkit.cli import admin, parser
from toolkit.cli.output import say
from toolkit.manager import queues

EXIT_DECLINED = 1
"""Exit code when the operator answers no to the prompt (nothing was written)."""

EPILOG = """\
Asks for confirmation when stdin is a terminal; --yes skips the question (scripts, CI).
Without a terminal there is no question.

exit codes:
  0    done, or nothing to do (already paused / not paused: said on stdout)
  1    the operator declined at the prompt: nothing changed
  2    bad usage: an empty reason, a queue name with control characters, a bad URL
  3    a server could not be reached
  4    the schema has no toolkit tables (nothing is created), or the role may not write
"""


def add_commands(sub: Any, common: Callable[..., None]) -> None:
    """Add pause and resume to the subparsers ``sub``."""
    pause = sub.add_parser(
        "pause", help="pause a queue: it hands out no job until resumed (writes)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pause QUEUE: no worker is handed a job of it (its other queues still\n"
        "serve; work in flight finishes). Recorded in PostgreSQL with the reason, who and\n"
        "when, so it survives a coordinator restart and a Redis loss. Pausing a paused\n"
        "queue changes nothing and keeps the first reason.")
    pause.add_argument("queue", metavar="QUEUE", help="the queue's name")
    pause.add_argument("--reason", required=True, metavar="TEXT", help="why (required, shown by "
                       "inspect queues, explain and Prometheus' toolkit_queue_paused)")
    _shared(pause, common)
    resume = sub.add_parser(
        "resume", help="resume a paused queue: its jobs are handed out again (writes)",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Resume QUEUE, paused by `toolkit pause`: workers are handed its jobs\n"
        "again. Resuming a queue that is not paused changes nothing.")
    resume.add_argument("queue", metavar="QUEUE", help="the queue's name")
    _shared(resume, common)
    _add_edit(sub, common)


EDIT_EPILOG = """\
Asks for confirmation when stdin is a terminal; --yes skips the question (scripts, CI).
Without a terminal there is no question.

exit codes:
  0    done: the job's new values are printed
  1    the operator declined at the prompt (nothing changed), or the job is unknown
       (NotFound) or no longer waiting (InvalidTransition: a worker has it, or it ended)
  2    bad usage: nothing to change, a bad priority, queue, age or time, both --run-at
       and --delay, a bad URL
  3    a server could not be reached
  4    the schema has no toolkit tables (nothing is created), or the role may not write
"""


def _add_edit(sub: Any, common: Callable[..., None]) -> None:
    edit = sub.add_parser(
        "edit", help="change a waiting job's priority, queue or due time (writes)",
        epilog=EDIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Edit JOB, a pending or queued job: its priority, its queue and/or when it\n"
        "may run. A queued job moves in Redis with its row (queue or due-time set). The\n"
        "change is an 'edited' event naming the actor, the reason and each value before\n"
        "and after. A job a worker holds, or one that ended, is refused.")
    edit.add_argument("job_id", metavar="JOB", help="the job's id")
    edit.add_argument("--priority", type=int, metavar="N", help="new priority (higher runs first)")
    edit.add_argument("--queue", metavar="NAME", help="move it to this queue")
    due = edit.add_mutually_exclusive_group()
    due.add_argument("--run-at", metavar="ISO", help="run it at this time (ISO 8601; UTC when "
                     "no offset is given), e.g. 2026-11-29T14:00Z")
    due.add_argument("--delay", metavar="AGE", help="run it after AGE from now (90s, 15m, 2h); "
                     "0s makes a scheduled job due now")
    edit.add_argument("--reason", metavar="TEXT", help="why (recorded in the job's event)")
    _shared(edit, common)


def _shared(p: argparse.ArgumentParser, common: Callable[..., None]) -> None:
    p.add_argument("--actor", metavar="NAME", help="who acts (default: user@host)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    common(p)


def confirmed(question: str, args: argparse.Namespace) -> bool:
    """Ask ``question`` on a terminal unless ``--yes``; True without a terminal."""
    if args.yes or not sys.stdin.isatty():
        return True
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _checked(args: argparse.Namespace) -> str | None:
    """Validate the queue and actor (exit 2 on bad input, before any server is asked)."""
    validate.identifier("queue", args.queue)
    return None if args.actor is None else validate.identifier("actor", args.actor)


def cmd_pause(args: argparse.Namespace) -> int:
    actor = _checked(args)
    reason = queues.check_reason(args.reason)
    if not confirmed(f"Pause queue {args.queue!r} (reason: {reason})?", args):
        print(f"toolkit: queue {args.queue!r}: declined, nothing changed", file=sys.stderr)
        return EXIT_DECLINED
    with admin._manager(args) as sm:
        if sm.pause_queue(args.queue, reason=reason, actor=actor):
            say(f"queue {args.queue!r} paused: no job of it is handed out until "
                f"`toolkit resume {args.queue}`")
            return 0
        held = sm.inspector.queues()
    if args.queue in held.index and held.loc[args.queue, "paused"]:  # else resumed meanwhile
        row = held.loc[args.queue]
        say(f"queue {args.queue!r} was already paused since {row['paused_since'].isoformat()} "
            f"by {row['paused_by']}: {row['reason']}; nothing changed")
    else:
        say(f"queue {args.queue!r} was already paused; nothing changed")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    actor = _checked(args)
    if not confirmed(f"Resume queue {args.queue!r}?", args):
        print(f"toolkit: queue {args.queue!r}: declined, nothing changed", file=sys.stderr)
        return EXIT_DECLINED
    with admin._manager(args) as sm:
        changed = sm.resume_queue(args.queue, actor=actor)
    say(f"queue {args.queue!r} resumed: its jobs are handed out again" if changed
        else f"queue {args.queue!r} was not paused; nothing changed")
    return 0


def _due(args: argparse.Namespace) -> dict[str, Any]:
    """``run_at``/``delay`` from --run-at/--delay (exit 2 on a bad one, before any server)."""
    if args.delay is not None:
        return {"delay": parser.parse_duration("delay", args.delay)}
    if args.run_at is not None:
        if re.fullmatch(r"-?\d+(\.\d+)?[smhdw]", args.run_at.strip().lower()):
            raise errors.ValidationError("run-at", args.run_at, "must be an ISO time; use --delay for an age")
        return {"run_at": parser.parse_time("run-at", args.run_at, datetime.now(UTC))}
    return {}


def cmd_edit(args: argparse.Namespace) -> int:
    actor = validate.identifier("actor", queues.default_actor() if args.actor is None else args.actor)
    if args.queue is not None:
        validate.identifier("queue", args.queue)
    due = _due(args)
    if args.priority is None and args.queue is None and not due:
        raise errors.ValidationError("edit", None, "give a priority, a queue or a due time "
                                     "(--priority, --queue, --run-at or --delay)")
    wanted = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in
                       (("priority", args.priority), ("queue", args.queue), *due.items())
                       if v is not None)
    if not confirmed(f"Edit job {args.job_id!r} ({wanted})?", args):
        print(f"toolkit: job {args.job_id!r}: declined, nothing changed", file=sys.stderr)
        return EXIT_DECLINED
    with admin._manager(args) as sm:
        before = sm.get_job(args.job_id)
        job = sm.edit_job(args.job_id, priority=args.priority, queue=args.queue,
                          reason=args.reason, actor=actor, **due)
    changes = [f"{k} {getattr(before, k)} -> {getattr(job, k)}"
               for k in ("priority", "queue", "run_at") if getattr(before, k) != getattr(job, k)]
    say(f"job {job.id!r} edited ({job.status}): " + ("; ".join(changes) or "no value changed"))
    return 0


COMMANDS = {"pause": cmd_pause, "resume": cmd_resume, "edit": cmd_edit}
