"""Printing frames: table, CSV or JSON records, with ``--limit``, ``--columns`` and ``--status``.

JSON is a list of plain records (the index is the first field), times in ISO 8601
with microseconds and an offset (``2026-11-29T05:38:55.123456+00:00``), missing
values ``null``, and JSON text columns (payload, result, metadata, detail,
queues) as nested JSON values, not strings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import pandas as pd

from toolkit import errors

JSON_COLUMNS = ("payload", "result", "metadata", "detail", "queues")
"""Columns that hold JSON text in the frames; JSON output nests them."""


def say(text: str) -> None:
    """Print a line to stdout, flushed (a pipe sees it at once)."""
    print(text, flush=True)


def warn(text: str) -> None:
    """Print a note for the operator to stderr (stdout stays machine-readable)."""
    print(f"toolkit: note: {text}", file=sys.stderr, flush=True)


def filter_status(frame: pd.DataFrame, name: str, status: str | None) -> pd.DataFrame:
    """Rows of ``frame`` with that status; an error when the frame has no status column."""
    if status is None:
        return frame
    if "status" not in frame.columns:
        raise errors.ValidationError("status", status, f"{name} has no status column")
    allowed = list(frame["status"].cat.categories) if hasattr(frame["status"], "cat") else []
    if status not in allowed:
        raise errors.ValidationError("status", status, f"must be one of {allowed} for {name}")
    return frame[frame["status"] == status]


def select(frame: pd.DataFrame, columns: str | None, limit: int | None) -> pd.DataFrame:
    """Apply ``--columns`` then ``--limit``."""
    if columns is not None:
        wanted = [c.strip() for c in columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in frame.columns]
        if unknown or not wanted:
            raise errors.ValidationError(
                "columns", columns, f"unknown {unknown}; valid: {', '.join(map(str, frame.columns))}")
        frame = frame[wanted]
    if limit is not None:
        if limit < 0:
            raise errors.ValidationError("limit", limit, "must be 0 or more")
        frame = frame.head(limit)
    return frame


def _cell(value: Any, column: str) -> Any:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if column in JSON_COLUMNS and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of ``frame`` as plain JSON-able dicts, the index first."""
    flat = frame.reset_index()
    cols = [str(c) for c in flat.columns]
    return [{c: _cell(v, c) for c, v in zip(cols, row, strict=True)}
            for row in flat.itertuples(index=False, name=None)]


def _table(frame: pd.DataFrame, *, header_only: bool = False) -> str:
    with pd.option_context("display.width", 160, "display.max_columns", 30,
                           "display.max_colwidth", 40):
        if header_only:  # the header lines of a one-row table
            return "\n".join(frame.head(1).to_string().splitlines()[:-1])
        return frame.to_string() if len(frame) else "(no rows)"


def emit(frame: pd.DataFrame, fmt: str, *, limit: int | None = None,
         columns: str | None = None) -> None:
    """Print ``frame`` in ``fmt`` after ``--columns`` and ``--limit``."""
    shown = select(frame, columns, limit)
    if fmt == "csv":
        sys.stdout.write(shown.to_csv())
    elif fmt == "json":
        sys.stdout.write(json.dumps(records(shown), ensure_ascii=False) + "\n")
    elif limit == 0 and len(frame):
        say(_table(select(frame, columns, 1), header_only=True))
    else:
        say(_table(shown))


def emit_args(frame: pd.DataFrame, args: argparse.Namespace) -> None:
    """:func:`emit` with the command's ``--format``, ``--limit`` and ``--columns``."""
    emit(frame, args.format, limit=getattr(args, "limit", None), columns=getattr(args, "columns", None))
