"""The argument parser of ``toolkit``: commands, global options, ages and times."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from toolkit import errors

EPILOG = """\
global options (--database-url, --redis-url, --namespace, --schema, -v) go before or after
the command. Read commands (check without --repair, purge --dry-run, inspect, jobs, explain,
snapshot, metrics, events, timeline, wait-times, heartbeat-gaps, metric-series) never
write, migrate or create anything. They print the values of sensitive payload, result and
metadata keys (password, token, api_key, ... and $TOOLKIT_SENSITIVE_KEYS) as *** unless
--unmask. pause and resume write, and ask first on a terminal unless --yes.

exit codes:
  0    success
  1    a check failed: check found a disagreement, demo lost a write, no such job;
       or the operator declined a prompt (pause, resume, requeue, cancel-jobs: nothing changed)
  2    bad usage or configuration: a flag, a URL (scheme, port), a value (a --payload
       that is not a JSON object)
  3    a server could not be reached (or failed while answering)
  4    the servers answered but the setup is wrong: no toolkit tables in the schema,
       unknown database or role, refused password, permission denied
  130  interrupted (Ctrl-C)
"""

FORMATS = ("table", "csv", "json")
AGE_FLAGS = ("--older-than", "--since", "--until", "--events-since", "--delay")
"""Flags whose value may look like an option (``-5d``): argparse would say 'expected one argument'."""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(-?)(\d+(?:\.\d+)?)([smhdw])")


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
    if match.group(1):
        raise errors.ValidationError(field, text, "must be positive: an age such as 30d, 12h, 15m or 90s")
    return float(match.group(2)) * _UNITS[match.group(3)]


def parse_time(field: str, text: str | None, now: datetime) -> datetime | None:
    """``text`` as a UTC time: an age before ``now`` (``10m``) or an ISO time (``2026-11-29T05:00``)."""
    if text is None:
        return None
    import pandas as pd

    if _DURATION.fullmatch(text.strip().lower()):
        return (pd.Timestamp(now) - pd.Timedelta(seconds=parse_duration(field, text))).to_pydatetime()
    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise errors.ValidationError(field, text, "must be an age (10m, 2h, 1d) or an ISO time") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime()


def join_ages(argv: Sequence[str]) -> list[str]:
    """Glue ``--older-than -5d`` into ``--older-than=-5d`` so the value reaches validation."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in AGE_FLAGS:
            value = next(it, None)
            if value is not None and re.fullmatch(r"-\d.*", value):
                out.append(f"{arg}={value}")
                continue
            out.append(arg)
            if value is not None:
                out.append(value)
            continue
        out.append(arg)
    return out


OPTION_GROUPS = ("servers", "target")
"""``servers``: --database-url/--redis-url; ``target``: --namespace/--schema."""


def global_options(p: argparse.ArgumentParser, *, top: bool,
                   groups: Sequence[str] = OPTION_GROUPS) -> None:
    """Add the options accepted before or after the command (``-v`` and ``groups``).

    On the top parser they carry the defaults; on a command's parser they are
    ``SUPPRESS``-ed so a value given before the command is not reset.
    """
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    if "servers" in groups:
        p.add_argument("--database-url", default=default(None),
                       help="PostgreSQL URL (default: $DATABASE_URL)")
        p.add_argument("--redis-url", default=default(None), help="Redis URL (default: $REDIS_URL)")
    if "target" in groups:
        p.add_argument("--namespace", default=default("wf"), help="Redis key namespace (default: wf)")
        p.add_argument("--schema", default=default("public"),
                       help="PostgreSQL schema (default: public)")
    p.add_argument("-v", "--verbose", action="store_true", default=default(False),
                   help="log at INFO level to stderr")


def unmask_option(p: argparse.ArgumentParser) -> None:
    """``--unmask``: print the values of sensitive payload/result/metadata keys (default ``***``)."""
    p.add_argument("--unmask", action="store_true",
                   help="show the values of sensitive keys (password, token, api_key, ... and "
                   "$TOOLKIT_SENSITIVE_KEYS), printed as *** by default")


def output_options(p: argparse.ArgumentParser, formats: Sequence[str] = FORMATS) -> None:
    """``--format``, ``--limit`` and ``--columns``, the same for every frame command."""
    p.add_argument("--format", choices=formats, default="table",
                   help="table (default), csv, or json (a list of records, ISO times to the µs)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N rows, in every format (0: the header only)")
    p.add_argument("--columns", metavar="A,B,C", help="only these columns (the index is always kept)")


def build(add_commands: Sequence[Callable[[Any, Callable[..., None]], None]]) -> argparse.ArgumentParser:
    """The whole parser; each of ``add_commands`` adds its subcommands."""
    p = argparse.ArgumentParser(
        prog="toolkit", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Look inside, and recover, the live state of a workflow orchestrator's "
                    "coordinator. URLs come from --database-url/--redis-url or DATABASE_URL/REDIS_URL.")
    global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, *, embedded: bool = False) -> None:
        global_options(sp, top=False, groups=("servers",) if embedded else OPTION_GROUPS)

    for add in add_commands:
        add(sub, common)
    return p
