"""The record of bulk operator actions (``operator_actions``, migration 0008), read-only.

A mixin of :class:`~toolkit.Inspector`: one ``COPY`` of the table in a read-only
transaction, typed by ``frames.SCHEMAS["actions"]``. A schema from before 0008 has
no such table: the frame is then empty, and nothing is created.
"""

from __future__ import annotations

import pandas as pd

from toolkit import masking
from toolkit.inspection import frames
from toolkit.tiers.postgres import export
from toolkit.tiers.postgres import tables as t
from toolkit.tiers.postgres.db import Database

_COLUMNS = {"id": "action_id", "verb": "verb", "status": "status", "actor": "actor",
            "reason": "reason", "planned": "planned", "applied": "applied", "skipped": "skipped",
            "value": "value", "filter": "filter", "created_at": "created_at",
            "updated_at": "updated_at", "finished_at": "finished_at"}


class Actions:
    """``actions()``: who did what to which jobs, and what came of it."""

    _db: Database
    unmask: bool
    masker: masking.Masker

    def actions(self, *, unmask: bool | None = None) -> pd.DataFrame:
        """One row per bulk action (index ``action_id``), oldest first.

        ``verb``, ``actor``, ``reason``; ``filter`` and ``value`` as JSON text;
        ``planned`` (jobs in the plan), ``applied`` (jobs this action changed,
        written with each batch, so true after a crash), ``skipped`` (jobs changed
        by someone else since the plan, as of the latest apply); ``status`` is
        ``applying`` until an apply ran to its end, then ``finished``. Values of
        sensitive keys in a payload filter read ``"***"`` unless ``unmask=True``
        (default: the Inspector's ``unmask``).
        """
        if not export.has_table(self._db, t.operator_actions.name):
            return frames.empty("actions")
        df = frames.from_arrow(export.select(self._db, t.operator_actions.name, _COLUMNS,
                                             order=("created_at", "id")))
        if df.empty:
            return frames.empty("actions")
        for col in ("created_at", "updated_at", "finished_at"):
            df[col] = frames.epoch_us_to_utc(df[col])
        if not (self.unmask if unmask is None else unmask):
            df["filter"] = df["filter"].map(self.masker.text).astype("string")
        return frames.conform("actions", df)
