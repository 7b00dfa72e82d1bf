"""Retention: purge finished jobs, their assignments and their events, in batches.

Each batch is one transaction through the pipeline (the cache entries go, the
memory entries go, ``jobs_purged`` counts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from toolkit import errors, models, validate
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.models import EntityKind as Kind
from toolkit.tiers.postgres import records

PURGEABLE = models.PURGEABLE_JOB_STATUSES


class Retention:
    """The retention verb of a StateManager."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def purge(self, older_than: float | timedelta, *,
              statuses: Sequence[str] = ("completed", "cancelled"), batch: int = 1000,
              dry_run: bool = False, progress: bool | None = None) -> int:
        """Remove finished jobs of finished workflows, their assignments and events, in batches.

        Retention never changes a live workflow: only jobs of ``completed`` or
        ``cancelled`` workflows are removed. A pending, running or failed
        workflow keeps every job (a failed one may be resumed by re-queueing
        its failed job), so its counts and its jobs' dependencies stay whole;
        cancel or delete a failed workflow to let it go. The workflow rows stay.

        Parameters
        ----------
        older_than
            Seconds (or a ``timedelta``) since the job finished.
        statuses
            Which finished statuses to remove: ``completed``, ``cancelled``
            and/or ``failed`` (failed for good). A live job, and any job of a
            live workflow, is never removed.
        batch
            Jobs per transaction.
        dry_run
            Count what would be removed (the same rule), remove nothing.
        progress
            Show a progress bar (default: when more than one batch).

        Returns
        -------
        int
            How many jobs were removed (or would be, with ``dry_run``).
        """
        age = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        age = validate.seconds("older_than", age, allow_zero=True)
        chosen = [validate.status("statuses", st, models.JobStatus).value for st in
                  validate.names("statuses", statuses)]
        if not chosen or not set(chosen) <= PURGEABLE:
            raise errors.ValidationError("statuses", statuses,
                                         f"must be some of {sorted(s.value for s in PURGEABLE)}")
        batch = validate.integer("batch", batch, low=1, high=100_000)
        before = self.pipe.now() - timedelta(seconds=age)
        with self.pipe.db.begin("purge: count") as conn:
            total = records.purgeable(conn, chosen, before)
        if dry_run or not total:
            return total
        from tqdm.auto import tqdm

        show = total > batch if progress is None else progress
        removed = 0
        with tqdm(total=total, disable=not show, desc="purge", unit="job", leave=False) as bar:
            while True:
                done = self._purge_batch(chosen, before, batch)
                removed += done
                bar.update(done)
                if done < batch:
                    return removed

    def _purge_batch(self, chosen: list[str], before: datetime, batch: int) -> int:
        changes = Changes(action="purge")
        with self.pipe.watermark.pending():
            with self.pipe.db.begin("purge") as conn:
                jobs, assignment_ids = records.purge_batch(conn, chosen, before, batch)
                changes.deleted.extend((Kind.JOB, r["id"]) for r in jobs)
                changes.deleted.extend((Kind.ASSIGNMENT, a) for a in assignment_ids)
                changes.unqueue.extend((r["id"], r["queue"]) for r in jobs)
                changes.counters["jobs_purged"] += len(jobs)
                self.pipe.note_deleting(changes.deleted)
            self.pipe.apply(changes)
        return len(jobs)
