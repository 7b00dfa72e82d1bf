"""Issue 8, the Inspector side: events, timeline, explain, snapshots, heartbeat gaps, wait times,
Prometheus export and the CLI commands around them, against real servers."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pandas as pd
import pandas.testing as pdt
import pytest
from prometheus_client.parser import text_string_to_metric_families

import toolkit
from tests.integration.test_inspector import table_digest
from toolkit import cli
from toolkit.inspection import frames, prometheus
from toolkit.inspection.explain import Explanation
from toolkit.tiers.redis import keys

FRAME_NAMES = ["workflows", "jobs", "workers", "assignments", "queue", "locks", "metrics", "tiers",
               "summary", "events"]


@pytest.fixture
def ins(clean) -> toolkit.Inspector:
    inspector = toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                  schema=clean.schema, heartbeat_ttl=2.0)
    yield inspector
    inspector.close()


def base(clean) -> list[str]:
    return ["--database-url", clean.database_url, "--redis-url", clean.redis_url,
            "--namespace", clean.namespace, "--schema", clean.schema]


def assert_schema(name: str, frame: pd.DataFrame) -> None:
    index_name, columns = frames.SCHEMAS[name]
    assert frame.index.name == index_name
    assert frame.index.dtype == frames.INDEX_DTYPES.get(name, frames.STRING), (name, frame.index.dtype)
    assert list(frame.columns) == list(columns)
    for col, dtype in columns.items():
        assert frame[col].dtype == dtype, (name, col, frame[col].dtype, dtype)


def reclaimed_job(sm: toolkit.StateManager) -> None:
    """Job 'a' is taken by worker 'dies', which dies; 'a' is reclaimed and completed by 'w2'."""
    sm.create_workflow("w", workflow_id="wf", jobs=[
        {"name": "a", "id": "a", "priority": 5},
        {"name": "b", "id": "b", "depends_on": ["a"], "queue": "other"},
        {"name": "c", "id": "c", "queue": "nobody"}])
    sm.register_worker("dies")
    sm.dequeue("dies")
    sm.start_job("a")
    time.sleep(sm.settings.heartbeat_ttl + 0.3)
    assert [j.id for j in sm.reap_dead_workers()] == ["a"]
    sm.register_worker("w2", queues=["default"])
    for _ in range(4):
        sm.heartbeat("w2")
        time.sleep(0.05)
    assert sm.dequeue("w2").id == "a"
    sm.start_job("a")
    sm.complete_job("a", {"ok": True})
    sm.incr_metric("custom", 3)


# -- events and timeline -------------------------------------------------------------------

def test_events_frame_is_typed_and_filtered_in_sql(sm, ins) -> None:
    assert_schema("events", ins.events())
    reclaimed_job(sm)
    ev = ins.events()
    assert_schema("events", ev)
    assert list(ev["event"].cat.categories) == list(frames.EVENTS)
    assert list(ev.index) == sorted(ev.index)
    assert set(ins.events(job_id="a")["job_id"]) == {"a"}
    assert set(ins.events(worker_id="dies")["event"]) == {"assigned", "started", "reclaimed"}
    assert len(ins.events(workflow_id="wf")) == len(ev)
    assert ins.events(job_id="a' OR '1'='1").empty  # a bound value, never SQL
    later = ev["at"].iloc[-1].to_pydatetime()
    assert (ins.events(since=later)["at"] >= later).all() and len(ins.events(since=later)) >= 1


@pytest.mark.parametrize("kwargs", [{"job_id": "a\x00b"}, {"workflow_id": "x" * 300},
                                    {"worker_id": 42}, {"since": "yesterday"},
                                    {"since": datetime(2024, 1, 1)}])
def test_events_hostile_filters_raise_validation_error(sm, ins, kwargs) -> None:
    with pytest.raises(toolkit.ValidationError):
        ins.events(**kwargs)


def test_timeline_gives_time_in_each_state(sm, ins) -> None:
    reclaimed_job(sm)
    tl = ins.timeline("a")
    assert_schema("timeline", tl)
    assert list(tl["event"]) == ["created", "queued", "assigned", "started", "reclaimed", "assigned",
                                 "started", "completed"]
    assert pd.isna(tl["state_s"].iloc[-1])  # completed: nothing more to wait for
    assert (tl["state_s"].iloc[:-1] >= 0).all()
    total = (tl["at"].iloc[-1] - tl["at"].iloc[0]).total_seconds()
    assert tl["state_s"].iloc[:-1].sum() == pytest.approx(total, abs=1e-3)
    running = tl[tl["event"] == "started"]["state_s"].iloc[0]
    assert running >= sm.settings.heartbeat_ttl  # the dead worker held it for a whole TTL
    live = ins.timeline("c")
    assert live["state_s"].iloc[-1] > 0  # still queued: counts until now
    with pytest.raises(toolkit.NotFound):
        ins.timeline("nope")


# -- explain --------------------------------------------------------------------------------

def test_explain_reclaimed_job_names_the_rule_and_both_workers(sm, ins) -> None:
    reclaimed_job(sm)
    ex = ins.explain("a")
    assert isinstance(ex, Explanation)
    assert ex.status == "completed" and ex.job_id == "a"
    assert "reclaimed" in ex.verdict and "heartbeat_ttl=2.0s" in ex.verdict
    assert "'dies'" in ex.verdict and "'w2'" in ex.verdict
    history = ex.facts["attempt_history"]
    assert [(h["worker_id"], h["ended"]) for h in history] == [("dies", "reclaimed"), ("w2", "completed")]
    assert history[0]["heartbeat_age_s"] > sm.settings.heartbeat_ttl
    assert str(ex).startswith(ex.verdict) and "attempts: 2" in str(ex)
    assert "<table>" in ex._repr_html_()
    pdt.assert_frame_equal(ex.timeline, ins.timeline("a"), check_exact=False, atol=1.0)


def test_explain_queued_job_reports_position_and_missing_workers(sm, ins) -> None:
    reclaimed_job(sm)
    sm.create_job("wf", "d", job_id="d", queue="nobody", priority=9)
    ex = ins.explain("c")
    assert ex.facts["position"] == 1 and ex.facts["higher_priority_ahead"] == 1
    assert ex.facts["live_workers"] == [] and "No live worker serves queue 'nobody'" in ex.verdict
    assert ex.facts["waited_s"] > 0
    assert ins.explain("d").facts["position"] == 0


def test_explain_pending_job_lists_unmet_dependencies(sm, ins) -> None:
    sm.create_workflow("w", workflow_id="wf", jobs=[
        {"name": "a", "id": "a"}, {"name": "b", "id": "b", "depends_on": ["a"]}])
    ex = ins.explain("b")
    assert ex.status == "pending" and ex.facts["unmet_dependencies"] == ["a"]
    assert "'a'" not in ex.verdict and "a (queued)" in ex.verdict


def test_explain_running_job_says_whether_it_will_be_reclaimed(sm, ins) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    sm.register_worker("w1")
    sm.dequeue("w1")
    sm.start_job("a")
    ex = ins.explain("a")
    assert ex.facts["worker_id"] == "w1" and ex.facts["will_be_reclaimed"] is False
    assert "alive" in ex.verdict
    time.sleep(ins.heartbeat_ttl + 0.3)
    ex = ins.explain("a")
    assert ex.facts["will_be_reclaimed"] is True and ex.facts["heartbeat_age_s"] > ins.heartbeat_ttl
    assert "reclaim" in ex.verdict


def test_explain_unknown_job_raises_not_found(sm, ins) -> None:
    with pytest.raises(toolkit.NotFound, match="nope"):
        ins.explain("nope")
    with pytest.raises(toolkit.ValidationError):
        ins.explain("bad\x00id")


# -- heartbeat gaps and wait times ----------------------------------------------------------

def test_heartbeat_gaps_suggest_a_ttl_above_every_gap(sm, ins) -> None:
    assert_schema("heartbeat_gaps", ins.heartbeat_gaps())
    reclaimed_job(sm)
    gaps = ins.heartbeat_gaps()
    assert_schema("heartbeat_gaps", gaps)
    assert set(gaps.index) == {"dies", "w2"}
    assert gaps.loc["w2", "n_beats"] >= 5 and gaps.loc["dies", "n_beats"] >= 1
    w2 = gaps.loc["w2"]
    assert 0 < w2["gap_p50_s"] <= w2["gap_p99_s"] <= w2["gap_max_s"] < 5
    ttl = gaps.attrs["suggested_ttl_s"]
    assert ttl == gaps["suggested_ttl_s"].iloc[0] and ttl > gaps["gap_max_s"].max()


def test_wait_times_by_priority_and_queue(sm, ins) -> None:
    assert_schema("wait_times_priority", ins.wait_times())
    reclaimed_job(sm)
    by_p = ins.wait_times(by="priority")
    assert_schema("wait_times_priority", by_p)
    assert list(by_p.index) == [5] and by_p.loc[5, "count"] == 2  # 'a' waited twice
    row = by_p.loc[5]
    assert 0 <= row["p50_s"] <= row["p90_s"] <= row["p99_s"] <= row["max_s"]
    by_q = ins.wait_times(by="queue")
    assert_schema("wait_times_queue", by_q)
    assert list(by_q.index) == ["default"]
    with pytest.raises(toolkit.ValidationError, match="by"):
        ins.wait_times(by="worker")


# -- snapshots ------------------------------------------------------------------------------

def test_snapshot_round_trip_keeps_every_frame_and_dtype(sm, tmp_path, clean) -> None:
    reclaimed_job(sm)
    sm.lock("maintenance", ttl=30).acquire()
    # A with block: a failed assertion still closes it (its pools left to the garbage
    # collector warn, as an error, in whichever later test the collection runs).
    with toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                           schema=clean.schema, heartbeat_ttl=60.0) as ins:  # liveness stays put
        path = ins.snapshot(tmp_path / "snap")
        live = {name: getattr(ins, name)() for name in FRAME_NAMES}
        off = toolkit.Inspector.from_snapshot(path)
        for name in FRAME_NAMES:
            got, want = getattr(off, name)(), live[name]
            assert_schema(name, got)
            if name == "workers":  # ages are as of the snapshot, a moment before
                got, want = got.drop(columns="heartbeat_age_s"), want.drop(columns="heartbeat_age_s")
            if name == "locks":
                got, want = got.drop(columns="ttl_s"), want.drop(columns="ttl_s")
            if name == "summary":  # an age too: as of the snapshot, it may be a second younger
                age = "oldest_queued_age_s"
                assert got.loc[age, "value"] <= want.loc[age, "value"] <= got.loc[age, "value"] + 2
                got, want = got.drop(index=age), want.drop(index=age)
            pdt.assert_frame_equal(got, want, check_exact=False, rtol=1e-9, obj=name)
        pdt.assert_frame_equal(off.metric_series(), ins.metric_series())
        pdt.assert_frame_equal(off.metric_series(freq="5min"), ins.metric_series(freq="5min"))
        pdt.assert_frame_equal(off.timeline("a").drop(columns="state_s"),
                               ins.timeline("a").drop(columns="state_s"))
        pdt.assert_frame_equal(off.heartbeat_gaps(), ins.heartbeat_gaps())
        pdt.assert_frame_equal(off.wait_times("queue"), ins.wait_times("queue"))
        pdt.assert_frame_equal(off.jobs(status="completed"), ins.jobs(status="completed"))
        pdt.assert_frame_equal(off.events(job_id="a"), ins.events(job_id="a"))
        assert off.explain("a").verdict == ins.explain("a").verdict
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["namespace"] == clean.namespace and manifest["rows"]["jobs"] == 3
        text = (path / "manifest.json").read_text()
        assert "redis://" not in text and "postgresql" not in text


def test_snapshot_reopens_with_no_server_and_refuses_live_calls(sm, ins, tmp_path) -> None:
    reclaimed_job(sm)
    since = datetime.now(UTC) - timedelta(hours=1)
    path = ins.snapshot(tmp_path / "s", events_since=since)
    sm.close()
    ins.close()
    off = toolkit.Inspector.from_snapshot(str(path))
    assert off.explain("c").facts["live_workers"] == []
    with pytest.raises(toolkit.ValidationError, match="multiple of 1min"):
        off.metric_series(freq="10s")
    with pytest.raises(toolkit.ToolkitError, match="live server"):
        off._db  # noqa: B018
    with pytest.raises(toolkit.ValidationError, match="snapshot"):
        toolkit.Inspector.from_snapshot(tmp_path / "missing")
    assert "toolkit_jobs" in prometheus.render(off)


# -- Prometheus ------------------------------------------------------------------------------

def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_prometheus_text_parses_back_with_every_family(sm, ins) -> None:
    reclaimed_job(sm)
    got = families(prometheus.render(ins))
    assert got["toolkit_custom"].type == "counter"
    assert got["toolkit_custom"].samples[0].name == "toolkit_custom_total"
    assert got["toolkit_custom"].samples[0].value == 3
    depth = {(s.labels["queue"], s.labels["priority"]): s.value for s in got["toolkit_queue_depth"].samples}
    assert depth == {("nobody", "0"): 1.0, ("other", "0"): 1.0}  # b was released into 'other'
    jobs = {s.labels["status"]: s.value for s in got["toolkit_jobs"].samples}
    assert jobs["completed"] == 1 and jobs["queued"] == 2
    assert set(jobs) == {s.value for s in toolkit.JobStatus}
    workers = {s.labels["state"]: s.value for s in got["toolkit_workers"].samples}
    assert workers == {"alive": 1.0, "unresponsive": 0.0, "inactive": 1.0}


def test_prometheus_counters_stay_monotonic_after_a_redis_wipe(sm, ins, clean) -> None:
    sm.incr_metric("custom", 7)
    sm.checkpoint_metrics()
    before = families(prometheus.render(ins))["toolkit_custom"].samples[0].value
    from tests.conftest import wipe_namespace

    wipe_namespace(clean.redis_url, clean.namespace)
    assert families(prometheus.render(ins))["toolkit_custom"].samples[0].value >= before == 7


# -- command line ---------------------------------------------------------------------------

def test_cli_explain_exit_codes(sm, clean, capsys, tmp_path) -> None:
    reclaimed_job(sm)
    assert cli.main(["explain", "a", *base(clean)]) == 0
    out = capsys.readouterr().out
    assert "reclaimed" in out and "'dies'" in out
    assert cli.main(["explain", "nope", *base(clean)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
    assert cli.main(["snapshot", str(tmp_path / "s"), "--events-since", "1h", *base(clean)]) == 0
    assert "events" in capsys.readouterr().out
    assert cli.main(["explain", "a", "--snapshot", str(tmp_path / "s")]) == 0
    assert "'w2'" in capsys.readouterr().out


def test_cli_metrics_formats(sm, clean, capsys) -> None:
    sm.incr_metric("custom", 2)
    assert cli.main(["metrics", "--format", "prometheus", *base(clean)]) == 0
    assert families(capsys.readouterr().out)["toolkit_custom"].samples[0].value == 2
    assert cli.main(["metrics", "--format", "json", *base(clean)]) == 0
    assert "custom" in {r["name"] for r in json.loads(capsys.readouterr().out)}


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serve_metrics_answers_get_metrics(sm, clean) -> None:
    sm.incr_metric("custom", 4)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "serve-metrics", "--port", str(port),
                             *base(clean)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    try:
        body = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        assert families(body)["toolkit_custom"].samples[0].value == 4
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_cli_purge_dry_run_then_purge(sm, clean, capsys) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}, {"name": "b", "id": "b"}])
    sm.cancel_job("a")
    assert cli.main(["purge", "--older-than", "0s", "--dry-run", *base(clean)]) == 0
    assert "would remove 0 job" in capsys.readouterr().out  # b is queued: the workflow is live
    sm.cancel_workflow(sm.get_job("a").workflow_id)
    assert cli.main(["purge", "--older-than", "0s", "--dry-run", *base(clean)]) == 0
    assert "would remove 2 job" in capsys.readouterr().out
    assert sm.get_job("a") is not None
    assert cli.main(["purge", "--older-than", "30d", *base(clean)]) == 0
    assert "removed 0 job" in capsys.readouterr().out
    assert cli.main(["purge", "--older-than", "0s", "--statuses", "cancelled", *base(clean)]) == 0
    assert "removed 2 job" in capsys.readouterr().out
    assert cli.main(["purge", "--older-than", "soon", *base(clean)]) == 2
    assert "older_than" in capsys.readouterr().err
    assert cli.main(["purge", "--older-than", "1d", "--statuses", "queued", *base(clean)]) == 2


@pytest.mark.parametrize(("text", "seconds"), [("30d", 2592000.0), ("12h", 43200.0), ("15m", 900.0),
                                               ("90s", 90.0), ("1.5h", 5400.0)])
def test_parse_duration_units(text, seconds) -> None:
    assert cli.parse_duration("older_than", text) == seconds


@pytest.mark.parametrize("text", ["", "30", "-1d", "1y", "d", "1d2h", "nan"])
def test_parse_duration_nonsense_raises_validation_error(text) -> None:
    with pytest.raises(toolkit.ValidationError, match="older_than"):
        cli.parse_duration("older_than", text)


def test_new_inspection_changes_nothing(sm, ins, raw_redis, raw_pg, clean, tmp_path) -> None:
    reclaimed_job(sm)
    sm.close()
    pattern = keys.namespace_pattern(clean.namespace)
    for k in raw_redis.scan_iter(match=pattern):
        raw_redis.persist(k)  # a heartbeat key expiring (TTL 2 s) mid-test is not a write
    before = {k: raw_redis.dump(k) for k in raw_redis.scan_iter(match=pattern)}
    rows = table_digest(raw_pg, clean.schema)
    ins.events()
    ins.timeline("a")
    ins.explain("a")
    ins.explain("c")
    ins.heartbeat_gaps()
    ins.wait_times()
    prometheus.render(ins)
    ins.snapshot(tmp_path / "s")
    assert {k: raw_redis.dump(k) for k in raw_redis.scan_iter(match=pattern)} == before
    assert table_digest(raw_pg, clean.schema) == rows
