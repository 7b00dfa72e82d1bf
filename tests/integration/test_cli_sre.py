"""The command line as an SRE uses it during an incident (issue 13).

Read commands create nothing and never report a false all-clear; setup mistakes have their
own exit code; URLs that drivers mis-parse give one line and never leak a password; the
frames print as asked (--limit, --columns, --status, JSON records); the analytics have
commands of their own.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import timedelta

import pandas as pd
import pytest

import toolkit
from tests.integration.test_cli import base, run
from toolkit import cli, models

SECRET = "Zq9sec@Xk7pw"


def typo() -> str:
    return f"typo_{uuid.uuid4().hex[:8]}"


def namespace_keys(raw_redis, namespace: str) -> list[str]:
    return list(raw_redis.scan_iter(match="{" + namespace + "}*", count=1000))


def schema_state(raw_pg, schema: str) -> tuple[int, int]:
    schemas = raw_pg.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,))
    n_schemas = schemas.fetchone()[0]
    tables = raw_pg.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,))
    return n_schemas, tables.fetchone()[0]


READ_COMMANDS = [
    ["check"], ["purge", "--older-than", "30d", "--dry-run"], ["inspect", "jobs"],
    ["inspect", "workers"], ["inspect", "summary"], ["explain", "a"], ["metrics"],
    ["metrics", "--format", "prometheus"], ["events", "--type", "failed", "--since", "10m"],
    ["timeline", "a"], ["wait-times"], ["heartbeat-gaps"], ["metric-series"],
    ["requeue", "--all", "--dry-run"], ["cancel-jobs", "--queue", "q", "--dry-run"], ["actions"],
    ["requeue", "--all", "--yes"],
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: " ".join(c))
def test_read_commands_on_a_typo_schema_create_nothing_and_say_so(
        command, clean, raw_pg, raw_redis, capsys) -> None:
    name = typo()
    args = ["--database-url", clean.database_url, "--redis-url", clean.redis_url,
            "--namespace", name, "--schema", name]
    assert cli.main([*command, *args]) == 4
    captured = capsys.readouterr()
    assert f"schema '{name}' has no toolkit tables" in captured.err
    assert "--schema" in captured.err and "consistent" not in captured.out
    assert schema_state(raw_pg, name) == (0, 0)
    assert namespace_keys(raw_redis, name) == []


def test_snapshot_of_a_typo_schema_writes_nothing(clean, raw_pg, tmp_path, capsys) -> None:
    name = typo()
    assert cli.main(["snapshot", str(tmp_path / "s"), "--database-url", clean.database_url,
                     "--redis-url", clean.redis_url, "--schema", name]) == 4
    assert "has no toolkit tables" in capsys.readouterr().err
    assert schema_state(raw_pg, name) == (0, 0) and not (tmp_path / "s" / "manifest.json").exists()


def test_check_reads_only_and_writes_no_redis_key(sm, clean, raw_redis, capsys) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    other = typo()
    code = cli.main(["check", *base(clean)[:4], "--namespace", other, "--schema", clean.schema])
    assert code == 1  # the live job is missing in that namespace: a finding
    assert "missing in Redis" in capsys.readouterr().out
    assert namespace_keys(raw_redis, other) == []


@pytest.mark.parametrize("url", ["postgresql://postgres@127.0.0.1:5432/no_such_db_i13",
                                 "postgresql://no_such_role_i13@127.0.0.1:5432/test"])
def test_wrong_database_or_role_is_a_setup_error_not_an_outage(url, clean) -> None:
    out = run("inspect", "jobs", "--database-url", url, "--redis-url", clean.redis_url)
    assert out.returncode == 4, out.stderr
    assert "does not exist" in out.stderr and "check the database, role and password" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", ["--database-url", "--redis-url"])
def test_a_non_numeric_port_is_one_line_and_exit_2(flag, clean) -> None:
    urls = {"--database-url": clean.database_url, "--redis-url": clean.redis_url}
    urls[flag] = {"--database-url": "postgresql://u:pw@127.0.0.1:notaport/test",
                  "--redis-url": "redis://127.0.0.1:notaport/0"}[flag]
    out = run("inspect", "jobs", *[x for kv in urls.items() for x in kv])
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "'notaport' is not a number" in out.stderr


@pytest.mark.parametrize("which", ["pg", "redis-auth", "redis-down"])
def test_a_password_with_an_unencoded_at_is_never_printed(which, clean) -> None:
    pg, rd = clean.database_url, clean.redis_url
    if which == "pg":
        pg = f"postgresql://u:{SECRET}@127.0.0.1:5432/test"
    elif which == "redis-auth":
        rd = f"redis://someone:{SECRET}@127.0.0.1:6379/0"
    else:
        rd = f"redis://:{SECRET}@127.0.0.1:1/0"
    out = run("inspect", "queue", "--database-url", pg, "--redis-url", rd, "--schema", clean.schema,
              "--namespace", clean.namespace)
    assert out.returncode in (2, 3, 4), out.stdout + out.stderr
    for piece in (SECRET, *SECRET.split("@")):
        assert piece not in out.stdout + out.stderr


def test_an_empty_namespace_is_said_plainly(sm, clean, capsys) -> None:
    sm.register_worker("w1")
    sm.heartbeat("w1")
    wrong = typo()
    args = [*base(clean)[:4], "--schema", clean.schema, "--namespace", wrong]
    for what in ("workers", "summary", "queue"):
        assert cli.main(["inspect", what, *args]) == 0
        assert f"namespace '{wrong}' holds no keys in Redis" in capsys.readouterr().err
    assert cli.main(["inspect", "workers", *base(clean)]) == 0
    assert "holds no keys" not in capsys.readouterr().err
    with toolkit.Inspector(clean.database_url, clean.redis_url, namespace=wrong,
                           schema=clean.schema) as ins:
        assert any("holds no keys" in n for n in ins.check_target())


def test_an_empty_schema_is_said_plainly(clean, capsys) -> None:
    with toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                    schema=clean.schema):
        pass
    assert cli.main(["inspect", "jobs", *base(clean)]) == 0
    assert f"schema '{clean.schema}' holds no workflows, jobs or workers" in capsys.readouterr().err


def some_jobs(sm) -> None:
    sm.create_workflow("w", jobs=[{"name": n, "id": n, "payload": {"k": [1, 2]}} for n in "abcde"])
    sm.register_worker("w1", queues=["default"])
    sm.register_worker("w2", queues=["default"])
    sm.deregister_worker("w2")
    job = sm.dequeue("w1")
    sm.start_job(job.id)
    sm.fail_job(job.id, "disk full", retry=False)


def test_limit_columns_and_status_apply_to_every_format(sm, clean, capsys) -> None:
    some_jobs(sm)
    for fmt in ("csv", "json", "table"):
        assert cli.main(["inspect", "jobs", "--format", fmt, "--limit", "2", *base(clean)]) == 0
        out = capsys.readouterr().out
        rows = (len(pd.read_csv(io.StringIO(out))) if fmt == "csv" else
                len(json.loads(out)) if fmt == "json" else len(out.strip().splitlines()) - 2)
        assert rows == 2, (fmt, out)
    assert cli.main(["inspect", "jobs", "--limit", "0", "--columns", "name,status", *base(clean)]) == 0
    out = capsys.readouterr().out
    assert "(no rows)" not in out and "name" in out and "status" in out and " a " not in out
    assert cli.main(["inspect", "jobs", "--columns", "name,status", "--format", "csv", *base(clean)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "job_id,name,status"
    assert cli.main(["inspect", "jobs", "--columns", "name,nope", *base(clean)]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "worker_id" in err
    assert cli.main(["inspect", "workers", "--status", "inactive", "--format", "csv", *base(clean)]) == 0
    assert list(pd.read_csv(io.StringIO(capsys.readouterr().out))["worker_id"]) == ["w2"]
    assert cli.main(["inspect", "queue", "--status", "queued", *base(clean)]) == 2
    assert "queue has no status column" in capsys.readouterr().err


def test_json_is_records_with_microseconds_and_nested_payloads(sm, clean, capsys) -> None:
    some_jobs(sm)
    assert cli.main(["inspect", "jobs", "--format", "json", *base(clean)]) == 0
    records = json.loads(capsys.readouterr().out)
    first = next(r for r in records if r["job_id"] == "a")
    assert first["payload"] == {"k": [1, 2]} and first["status"] in {s.value for s in models.JobStatus}
    created = pd.Timestamp(first["created_at"])
    frame = sm.inspector.jobs()
    assert created == frame.loc["a", "created_at"]  # to the microsecond
    assert first["created_at"].endswith("+00:00") and len(first["created_at"]) == 32


def test_global_options_before_the_command_and_negative_ages(sm, clean, capsys) -> None:
    some_jobs(sm)
    assert cli.main([*base(clean), "inspect", "jobs", "--format", "csv"]) == 0
    assert len(pd.read_csv(io.StringIO(capsys.readouterr().out))) == 5
    assert cli.main(["-v", *base(clean)[:4], "inspect", "--namespace", clean.namespace,
                     "--schema", clean.schema, "workers"]) == 0
    assert cli.main(["purge", "--older-than", "-5d", *base(clean)]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_snapshot_refuses_a_non_empty_folder_unless_forced(sm, clean, tmp_path, capsys) -> None:
    some_jobs(sm)
    target = tmp_path / "snap"
    assert cli.main(["snapshot", str(target), *base(clean)]) == 0
    assert cli.main(["snapshot", str(target), *base(clean)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert cli.main(["snapshot", str(target), "--force", *base(clean)]) == 0
    with pytest.raises(toolkit.ValidationError, match="not empty"):
        sm.inspector.snapshot(target)
    assert sm.inspector.snapshot(target, overwrite=True) == target


def test_sre_commands_answer_without_python(sm, clean, capsys) -> None:
    some_jobs(sm)
    sm.incr_metric("custom", 3)
    args = ["--format", "json", *base(clean)]
    assert cli.main(["events", "--type", "failed", "--since", "10m", *args]) == 0
    failed = json.loads(capsys.readouterr().out)
    assert [e["event"] for e in failed] == ["failed"] and failed[0]["detail"]["error"] == "disk full"
    assert cli.main(["events", "--type", "nope", *args]) == 2
    capsys.readouterr()
    assert cli.main(["timeline", failed[0]["job_id"], *args]) == 0
    events = [e["event"] for e in json.loads(capsys.readouterr().out)]
    assert events[0] == "created" and events[-1] == "failed"
    assert cli.main(["wait-times", "--by", "priority", *args]) == 0
    assert json.loads(capsys.readouterr().out)[0]["count"] >= 1
    assert cli.main(["heartbeat-gaps", *args]) == 0
    assert {r["worker_id"] for r in json.loads(capsys.readouterr().out)} >= {"w1"}
    assert cli.main(["metric-series", "--names", "custom", "--since", "1h", "--freq", "5min", *args]) == 0
    assert sum(r["custom"] for r in json.loads(capsys.readouterr().out)) == 3
    assert cli.main(["metric-series", "--names", "nope", *args]) == 2
    assert "nope" in capsys.readouterr().err


def test_metric_series_refuses_bad_input_alike_live_and_offline(sm, clean, tmp_path) -> None:
    sm.incr_metric("custom", 2)
    ins = sm.inspector
    pd.testing.assert_frame_equal(ins.metric_series("custom"), ins.metric_series(["custom"]))
    with pytest.raises(toolkit.ValidationError, match="'nope'"):
        ins.metric_series(["custom", "nope"])
    assert ins.metric_series(["jobs_purged"])["jobs_purged"].sum() == 0  # automatic: known before use
    off = toolkit.Inspector.from_snapshot(ins.snapshot(tmp_path / "s"))
    for source in (ins, off):
        with pytest.raises(toolkit.ValidationError, match="multiple of 1min"):
            source.metric_series(["custom"], freq="10s")
    now = pd.Timestamp.now(tz="UTC").to_pydatetime()
    window = ins.metric_series(["custom"], since=now - timedelta(hours=1), until=now + timedelta(minutes=1))
    assert int(window["custom"].sum()) == 2
    assert ins.metric_series(["custom"], until=now - timedelta(hours=1)).empty
    assert off.metric_series(["custom"], until=now - timedelta(hours=1)).empty
    with pytest.raises(toolkit.ValidationError, match="until"):
        ins.metric_series(["custom"], since=now, until=now - timedelta(hours=1))


@pytest.mark.parametrize("command", ["events", "timeline", "wait-times", "heartbeat-gaps",
                                     "metric-series", "snapshot", "purge"])
def test_help_of_the_new_commands_and_the_exit_codes(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout and "--database-url" in out.stdout
    top = run("--help").stdout
    assert "exit codes:" in top and "4    the servers answered but the setup is wrong" in top


def test_one_tier_down_still_shows_the_frames_of_the_other(sm, clean, capsys) -> None:
    some_jobs(sm)
    dead_redis = ["--database-url", clean.database_url, "--redis-url", "redis://127.0.0.1:1/0",
                  "--namespace", clean.namespace, "--schema", clean.schema]
    assert cli.main(["inspect", "jobs", "--format", "csv", *dead_redis]) == 0
    captured = capsys.readouterr()
    assert len(pd.read_csv(io.StringIO(captured.out))) == 5
    assert captured.err == ""  # the command did not need Redis: no noise about it
    assert cli.main(["inspect", "workers", *dead_redis]) == 3
    assert "toolkit: unavailable: Redis at 127.0.0.1:1" in capsys.readouterr().err
    dead_pg = ["--database-url", "postgresql://nobody:pw@127.0.0.1:1/x", "--redis-url", clean.redis_url,
               "--namespace", clean.namespace, "--schema", clean.schema]
    assert cli.main(["inspect", "queue", "--format", "csv", *dead_pg]) == 0
    captured = capsys.readouterr()
    assert len(pd.read_csv(io.StringIO(captured.out))) == 4 and captured.err == ""
