"""The commands that change how work flows: ``pause`` and ``resume`` a queue.

They write (through a StateManager, never the Inspector), ask for confirmation
on a terminal unless ``--yes``, and check their input before any server is
contacted. A schema without toolkit tables is refused, never created.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from toolkit import validate
from toolkit.cli import admin
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


COMMANDS = {"pause": cmd_pause, "resume": cmd_resume}
