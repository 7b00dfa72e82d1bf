"""``Inspector.explain(job_id)``: why is this job where it is?

The answer is built from frames only (the job, its event log, the queue, the
workers, wait times), so it works the same on a live system and on a snapshot.
"""

from __future__ import annotations

import dataclasses
import html
import json
from typing import TYPE_CHECKING, Any

import pandas as pd

from toolkit import errors, validate
from toolkit.inspection import analytics, frames, paused

if TYPE_CHECKING:
    from toolkit.inspection.analytics import Analytics

KEY_FACTS = ("status", "workflow_status", "queue", "queue_paused", "priority", "attempts", "max_attempts",
             "worker_id", "position", "queue_length", "higher_priority_ahead", "live_workers", "waited_s",
             "queue_median_wait_s", "unmet_dependencies", "heartbeat_age_s", "heartbeat_ttl_s",
             "will_be_reclaimed", "error")
"""The facts ``str(explanation)`` prints after the verdict, when present."""


@dataclasses.dataclass(frozen=True, eq=False)
class Explanation:
    """Why a job is where it is: a readable verdict, the facts behind it, and its timeline.

    Attributes
    ----------
    job_id, status
        The job and its current status (``"deleted"`` when only its history is left).
    verdict
        A short paragraph in plain words.
    facts
        The numbers and names the verdict is built from (position, waits,
        worker, heartbeat age, ``attempt_history``...).
    timeline
        The job's events (``Inspector.timeline``).
    """

    job_id: str
    status: str
    verdict: str
    facts: dict[str, Any]
    timeline: pd.DataFrame

    def __str__(self) -> str:
        lines = [self.verdict]
        lines += [f"  {k}: {_show(self.facts[k])}" for k in KEY_FACTS if k in self.facts]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td>{html.escape(_show(self.facts[k]))}</td></tr>"
                       for k in KEY_FACTS if k in self.facts)
        return (f"<div><p>{html.escape(self.verdict)}</p><table>{rows}</table>"
                f"{self.timeline.to_html(max_rows=50)}</div>")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "(none)"
    return str(value)


def human_seconds(value: float) -> str:
    """A duration for people: ``under 0.1s``, ``4.2s``, ``42s``, ``3m 05s``, ``2h 07m``."""
    if value < 0.05:
        return "under 0.1s"
    if round(value, 1) < 10:
        return f"{value:.1f}s"
    if value < 59.5:
        return f"{round(value)}s"
    whole = round(value)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


_secs = human_seconds

MEDIAN_FOR_RATIO_S = 1.0
"""Below this median wait a ratio against it is noise, so ``explain`` gives none."""


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``21st``..."""
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _detail(text: Any) -> dict[str, Any]:
    if text is None or text is pd.NA or (isinstance(text, float) and pd.isna(text)):
        return {}
    loaded = json.loads(str(text))
    return loaded if isinstance(loaded, dict) else {}


def _scalar(value: Any) -> Any:
    """A frame cell as a plain Python value (NA becomes None)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def explain(source: Analytics, job_id: str, *, unmask: bool | None = None) -> Explanation:
    """Explain ``job_id`` from ``source``'s frames; see :meth:`toolkit.Inspector.explain`."""
    validate.identifier("job_id", job_id)
    events = source.events(job_id=job_id, unmask=unmask)
    job = _find_job(source, job_id, events)
    if job is None and events.empty:
        raise errors.NotFound("job", job_id)
    now = source._now()
    timeline = analytics.timeline_frame(events, now) if len(events) else frames.empty("timeline")
    if job is None:
        return _deleted(job_id, events, timeline)
    facts: dict[str, Any] = {k: _scalar(job[k]) for k in (
        "name", "workflow_id", "status", "queue", "priority", "attempts", "max_attempts",
        "worker_id")}
    facts["job_id"] = job_id
    facts["run_at"] = _scalar(job.get("run_at"))
    status = str(facts["status"])
    name = f"Job {facts['name']!r} ({job_id})"
    handler = _BY_STATUS.get(status, _finished)
    sentences = handler(source, facts, events, now)
    workflow = _workflow(source, facts)
    if workflow:
        sentences.append(workflow)
    history = attempt_history(events)
    if history and (len(history) > 1 or any(a["ended"] in ("reclaimed", "failed") for a in history)):
        facts["attempt_history"] = history
        sentences.append(" ".join(_attempt_sentence(a) for a in history))
    verdict = f"{name} is {status}" + (": " if sentences else ".") + " ".join(sentences)
    return Explanation(job_id, status, verdict, facts, timeline)


def _find_job(source: Analytics, job_id: str, events: pd.DataFrame) -> pd.Series | None:
    wf = str(events["workflow_id"].iloc[0]) if len(events) else None
    jobs = source.jobs(workflow_id=wf)
    if job_id not in jobs.index:
        return None
    row = jobs.loc[job_id]
    return row if isinstance(row, pd.Series) else None


def _workflow(source: Analytics, facts: dict[str, Any]) -> str:
    """The workflow's status, and why, when a job of it failed for good (the roll-up's rule)."""
    wf_id = str(facts["workflow_id"])
    workflows = source.workflows()
    if wf_id not in workflows.index:
        return ""
    row = workflows.loc[wf_id]
    status = facts["workflow_status"] = str(row["status"])
    failed = int(_scalar(row["jobs_failed"]) or 0)
    progressing = sum(int(_scalar(row[f"jobs_{s}"]) or 0) for s in ("queued", "assigned", "running"))
    if status == "failed":
        return (f"Its workflow {wf_id!r} is failed: {failed} job(s) failed for good and no job of "
                "it can progress until a failed job is re-queued (`sm.enqueue(job_id)`).")
    if failed and status == "running":
        return (f"Its workflow {wf_id!r} is running: {failed} job(s) failed for good, but "
                f"{progressing} job(s) of it can still progress.")
    return ""


def _deleted(job_id: str, events: pd.DataFrame, timeline: pd.DataFrame) -> Explanation:
    last = events.iloc[-1]
    history = attempt_history(events)
    facts: dict[str, Any] = {"job_id": job_id, "status": "deleted",
                             "last_event": str(last["event"]), "last_status": str(last["status"]),
                             "workflow_id": str(last["workflow_id"]), "attempt_history": history}
    verdict = (f"Job {job_id} no longer exists (its last event was {last['event']!r}, status "
               f"{last['status']!r}); only its event log is left. "
               + " ".join(_attempt_sentence(a) for a in history)).strip()
    return Explanation(job_id, "deleted", verdict, facts, timeline)


def _scheduled(facts: dict[str, Any], events: pd.DataFrame, now: pd.Timestamp) -> str | None:
    """When a scheduled job (a delay, or a retry backing off) will run; None when it is due."""
    run_at = facts.get("run_at")
    if run_at is None or pd.Timestamp(run_at) <= now:
        return None
    when = (f"it will run at {pd.Timestamp(run_at):%Y-%m-%d %H:%M:%S} UTC, in "
            f"{human_seconds((pd.Timestamp(run_at) - now).total_seconds())} (not handed out before)")
    failed = events[events["event"] == "failed"]
    if facts["attempts"] and len(failed):
        error = _detail(failed["detail"].iloc[-1]).get("error")
        return (f"it is scheduled for a retry: attempt {facts['attempts']} failed "
                f"({error!r}) and the retry backs off; {when}.")
    return f"it is scheduled: {when}."


def _queued(source: Analytics, facts: dict[str, Any], events: pd.DataFrame,
            now: pd.Timestamp) -> list[str]:
    out: list[str] = []
    name = str(facts["queue"])
    later = _scheduled(facts, events, now)
    if later:
        return [later, _serving(source, facts, name)]
    q = source.queue()
    if facts["job_id"] in q.index and bool(q.loc[facts["job_id"], "in_flight"]):
        out.append("a worker has just popped it and the assignment is being committed.")
    elif facts["job_id"] in q.index:
        mine = q[(q["queue"] == name) & ~q["in_flight"].astype(bool)]
        facts["position"] = int(q.loc[facts["job_id"], "position"])
        facts["queue_length"] = len(mine)
        facts["higher_priority_ahead"] = int((mine["priority"] > facts["priority"]).sum())
        out.append(_place(facts, name))
    elif facts.get("run_at") is not None:  # due, still in its queue's due-time set
        out.append(f"it was scheduled for {pd.Timestamp(facts['run_at']):%Y-%m-%d %H:%M:%S} UTC "
                   f"and is due: the next dequeue on queue {name!r} moves it into the queue.")
    else:
        out.append(f"PostgreSQL says queued but it is not in the Redis queue {name!r}: "
                   "run `toolkit check --repair`.")
    held = paused.sentence(source._paused(), name)
    if held:
        facts["queue_paused"] = True
        out.append(held)
    out.append(_serving(source, facts, name))
    out.append(_waited(source, facts, events, now, name))
    return out


def _place(facts: dict[str, Any], name: str) -> str:
    """Where the job stands in its queue, in words (``position`` is 0 for the next pop)."""
    n, ahead = int(facts["queue_length"]), int(facts["higher_priority_ahead"])
    queued = f"{n} job{'s' if n != 1 else ''} queued"
    if facts["position"] == 0:
        return f"it is next in line in queue {name!r} ({queued})."
    higher = f", {ahead} of them of higher priority" if ahead else ""
    return (f"it is {ordinal(int(facts['position']) + 1)} of {n} in queue {name!r} "
            f"({facts['position']} ahead of it{higher}).")


def _serving(source: Analytics, facts: dict[str, Any], name: str) -> str:
    w = source.workers()
    alive = w[w["alive"].fillna(False).astype(bool) & (w["status"] == "active")]
    serving = sorted(str(i) for i, qs in alive["queues"].items() if name in str(qs).split(","))
    facts["live_workers"] = serving
    if not serving:
        return (f"No live worker serves queue {name!r}: nothing will take this job until a "
                "worker for that queue registers or resumes its heartbeats.")
    return f"{len(serving)} live worker(s) serve queue {name!r}: {', '.join(serving)}."


def _waited(source: Analytics, facts: dict[str, Any], events: pd.DataFrame, now: pd.Timestamp,
            name: str) -> str:
    queued = events[events["status"] == "queued"]
    if queued.empty:
        return ""
    # the start of the current stay: the first of the trailing run of queued-status events
    flags = events["status"].astype(object).eq("queued").astype(int)
    tail = flags[::-1].cumprod()[::-1].astype(bool)
    since = events.loc[tail, "at"].iloc[0] if tail.any() else queued["at"].iloc[-1]
    facts["waited_s"] = round((now - since).total_seconds(), 3)
    waits = source.wait_times("queue")
    median = _scalar(waits.loc[name, "p50_s"]) if name in waits.index else None
    facts["queue_median_wait_s"] = median
    text = f"It has waited {_secs(facts['waited_s'])}"
    if median is None:
        return text + f"; no job of queue {name!r} has been assigned yet, so there is no median wait."
    if median < MEDIAN_FOR_RATIO_S:
        return text + f" vs a median wait of {_secs(median)} in {name!r}."
    ratio = facts["waited_s"] / median
    shown = f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"
    return text + f" vs a median wait of {_secs(median)} in {name!r} ({shown}x the median)."


def _pending(source: Analytics, facts: dict[str, Any], events: pd.DataFrame,
             now: pd.Timestamp) -> list[str]:
    deps = source._dependencies()
    mine = [str(d) for d in deps.loc[deps.index == facts["job_id"], "depends_on"]]
    jobs = source.jobs(workflow_id=str(facts["workflow_id"]))
    status = {d: (str(jobs.loc[d, "status"]) if d in jobs.index else "deleted") for d in mine}
    unmet = [d for d in mine if status[d] != "completed"]
    facts["dependencies"] = mine
    facts["unmet_dependencies"] = unmet
    if not unmet:
        return ["every dependency is completed; it should be queued at once (run `toolkit check`)."]
    names = [f"{jobs.loc[d, 'name']!s} ({status[d]})" if d in jobs.index else f"{d} (deleted)"
             for d in unmet]
    out = [f"it waits for {len(unmet)} of {len(mine)} dependencies: {', '.join(names)}."]
    dead = [d for d in unmet if status[d] in ("failed", "cancelled", "deleted")]
    if dead:
        out.append("A dependency ended without completing, so this job will not run unless it "
                   "is retried.")
    return out


def _held(source: Analytics, facts: dict[str, Any], events: pd.DataFrame,
          now: pd.Timestamp) -> list[str]:
    wid = facts["worker_id"]
    ttl = source.heartbeat_ttl
    facts["heartbeat_ttl_s"] = ttl
    origin = str(getattr(source, "heartbeat_ttl_source", "the snapshot's manifest"))
    facts["heartbeat_ttl_source"] = origin
    workers = source.workers()
    if wid is None or wid not in workers.index:
        facts["will_be_reclaimed"] = True
        return [f"it is held by worker {wid!r}, which is not registered: a repair is needed."]
    w = workers.loc[wid]
    age = _scalar(w["heartbeat_age_s"])
    facts["heartbeat_age_s"] = None if age is None else round(float(age), 3)
    doomed = str(w["status"]) != "active" or age is None or age > ttl
    facts["will_be_reclaimed"] = doomed
    text = (f"it is held by worker {wid!r} (attempt {facts['attempts']} of "
            f"{facts['max_attempts']}). ")
    if age is None:
        return [text + "That worker has never sent a heartbeat: the reaper will reclaim the job."]
    said = ", a default: no coordinator recorded one" if "default " in origin else ""
    text += f"Its last heartbeat was {_secs(float(age))} ago (heartbeat TTL {_secs(ttl)}{said}): "
    if doomed:
        return [text + "the worker counts as dead, so the next reap_dead_workers() will reclaim "
                "the job and re-queue it (or fail it when it is out of attempts)."]
    return [text + "the worker is alive and the job will not be reclaimed."]


def _finished(source: Analytics, facts: dict[str, Any], events: pd.DataFrame,
              now: pd.Timestamp) -> list[str]:
    failed = events[events["event"] == "failed"]
    if facts["status"] == "failed" and len(failed):
        facts["error"] = _detail(failed["detail"].iloc[-1]).get("error")
        return [f"it failed for good after {facts['attempts']} attempt(s) of "
                f"{facts['max_attempts']}; last error: {facts['error']!r}."]
    if facts["status"] == "completed":
        return [f"it completed on worker {facts['worker_id']!r} at attempt {facts['attempts']}."]
    return ["it was cancelled."] if facts["status"] == "cancelled" else []


_BY_STATUS = {"queued": _queued, "pending": _pending, "assigned": _held, "running": _held}


def attempt_history(events: pd.DataFrame) -> list[dict[str, Any]]:
    """One dict per attempt (each ``assigned`` event): worker, how it ended, and why."""
    attempts: list[dict[str, Any]] = []
    for _, e in events.iterrows():
        name = str(e["event"])
        if name == "assigned":
            attempts.append({"attempt": _scalar(e["attempt"]), "worker_id": _scalar(e["worker_id"]),
                             "assigned_at": e["at"], "ended": None})
        elif attempts and attempts[-1]["ended"] is None and name in (
                "completed", "failed", "reclaimed", "cancelled", "deleted"):
            detail = _detail(e["detail"])
            attempts[-1].update(ended=name, ended_at=e["at"], **{
                k: detail[k] for k in ("error", "rule", "heartbeat_age_s") if k in detail})
    return attempts


def _attempt_sentence(a: dict[str, Any]) -> str:
    head = f"Attempt {a['attempt']} on worker {a['worker_id']!r}"
    if a["ended"] is None:
        return head + " is still in progress."
    if a["ended"] == "reclaimed":
        age = a.get("heartbeat_age_s")
        return (head + f" was reclaimed (rule: {a.get('rule')}; heartbeat age "
                + (_secs(float(age)) if age is not None else "unknown") + ").")
    if a["ended"] == "failed":
        return head + f" failed with error {a.get('error')!r}."
    return head + f" {'was ' if a['ended'] in ('cancelled', 'deleted') else ''}{a['ended']}."
