"""Least privilege: a SELECT-only Inspector, a DML-only StateManager, a refused migration.

Issue 7, "least privilege". Everything runs on the session's ``private`` server
pair (never the shared servers): roles and ACL users get random names and are
dropped at the end. The private PostgreSQL uses trust authentication, so the
passwords below are never checked by it, but they travel in every URL, which is
what the "never in an error" assertions need.
"""

from __future__ import annotations

import contextlib
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

import toolkit
from tests.reliability.conftest import Private, assert_rebuild_loaded_everything
from toolkit.tiers.postgres import migrate
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import keys

# The minimal Redis ACL an Inspector needs (found by experiment, see the report):
# read commands on the namespace's keys, CLIENT SETNAME (the client names its
# connections) and nothing else: no write command, no pub/sub channel at all.
INSPECTOR_ACL = ("-@all", "+@read", "+client|setname")


@dataclass(frozen=True)
class Roles:
    """Least-privilege accounts on the private servers."""

    reader_url: str  # PostgreSQL role with USAGE on the schema and SELECT on its tables
    writer_url: str  # PostgreSQL role with DML and sequence USAGE, no DDL anywhere
    acl_redis_url: str  # Redis ACL user: read commands on {ns}:* only
    pg_password: str
    redis_password: str
    reader: str
    writer: str


def _pg_url(private: Private, user: str, password: str) -> str:
    port = private.stack.pg_port
    return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{port}/postgres"


def _assert_no_secret(exc: BaseException, *secrets: str) -> None:
    """Neither the error, its message, nor any chained cause shows a password."""
    text = "".join(traceback.format_exception(exc))
    shown = [str(exc), repr(exc), text]
    for secret in secrets:
        for s in shown:
            assert secret not in s, f"password leaked in: {s[:2000]}"


@pytest.fixture
def roles(private: Private) -> Iterator[Roles]:
    """Create the schema as the superuser, then the least-privilege roles and the ACL user."""
    suffix = uuid.uuid4().hex[:10]
    reader, writer, acl_user = f"tk_ro_{suffix}", f"tk_rw_{suffix}", f"tk_ins_{suffix}"
    pg_password = f"pgpw-{uuid.uuid4().hex}"
    redis_password = f"rdpw-{uuid.uuid4().hex}"
    with private.manager():  # creates and migrates the schema as the superuser
        pass
    schema = sql.Identifier(private.schema)
    with psycopg.connect(private.libpq_url, autocommit=True) as conn:
        for role in (reader, writer):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(pg_password)))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(
            schema, sql.Identifier(reader)))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}")
                     .format(schema, sql.Identifier(writer)))
        conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
            schema, sql.Identifier(writer)))
    ns = keys.prefix(private.namespace)
    admin = private.raw_redis()
    admin.execute_command("ACL", "SETUSER", acl_user, "reset", "on", f">{redis_password}",
                          f"~{ns}*", "resetchannels", *INSPECTOR_ACL)
    port = private.stack.redis_port
    try:
        yield Roles(
            reader_url=_pg_url(private, reader, pg_password),
            writer_url=_pg_url(private, writer, pg_password),
            acl_redis_url=f"redis://{acl_user}:{redis_password}@127.0.0.1:{port}/0",
            pg_password=pg_password, redis_password=redis_password, reader=reader, writer=writer,
        )
    finally:
        with contextlib.suppress(redis.RedisError):
            admin.execute_command("ACL", "DELUSER", acl_user)
        admin.close()
        with psycopg.connect(private.libpq_url, autocommit=True) as conn:
            for role in (reader, writer):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _populate(sm: toolkit.StateManager) -> dict[str, str]:
    """Every kind of state an Inspector shows: jobs in each stage, a worker, a lock, metrics."""
    wf = sm.create_workflow("lp", jobs=[
        {"name": "a", "priority": 5}, {"name": "b", "depends_on": ["a"]}, {"name": "c"},
        {"name": "d", "queue": "other", "priority": 2}])
    sm.register_worker("w1", queues=["default"])
    sm.heartbeat("w1")
    first = sm.dequeue("w1")
    assert first is not None
    sm.start_job(first.id)
    sm.complete_job(first.id, {"rows": 1})
    second = sm.dequeue("w1")  # stays assigned: an active assignment
    assert second is not None
    sm.heartbeat("w1")
    sm.incr_metric("custom", 3)
    sm.checkpoint_metrics()
    return {"workflow": wf.id, "done": first.id, "assigned": second.id}


def _every_frame(ins: toolkit.Inspector, ids: dict[str, str], tmp: Path) -> dict[str, int]:
    """Call every Inspector frame and insight method; return the row counts."""
    frames = {
        "workflows": ins.workflows(), "jobs": ins.jobs(), "jobs_wf": ins.jobs(workflow_id=ids["workflow"]),
        "jobs_queued": ins.jobs(status="queued"), "workers": ins.workers(),
        "assignments": ins.assignments(), "queue": ins.queue(), "locks": ins.locks(),
        "metrics": ins.metrics(), "metric_series": ins.metric_series(), "tiers": ins.tiers(),
        "summary": ins.summary(), "events": ins.events(), "timeline": ins.timeline(ids["done"]),
        "heartbeat_gaps": ins.heartbeat_gaps(), "wait_times": ins.wait_times(),
        "wait_times_queue": ins.wait_times(by="queue"),
    }
    text = str(ins.explain(ids["assigned"]))
    assert ids["assigned"] in text
    assert "<table" in ins._repr_html_()
    assert ins.snapshot(tmp / "snap").exists()
    return {name: len(df) for name, df in frames.items()}


def test_inspector_runs_every_frame_with_select_only_and_a_read_only_acl(
        private: Private, roles: Roles, tmp_path: Path) -> None:
    with private.manager() as sm:
        ids = _populate(sm)
        with sm.lock("nightly", ttl=60):
            with toolkit.Inspector(private.database_url, private.redis_url, namespace=private.namespace,
                                   schema=private.schema) as full:
                expected = _every_frame(full, ids, tmp_path / "full")
            with toolkit.Inspector(roles.reader_url, roles.acl_redis_url, namespace=private.namespace,
                                   schema=private.schema) as ins:
                counts = _every_frame(ins, ids, tmp_path / "least")
                assert counts == expected
                assert counts["locks"] == 1 and counts["assignments"] >= 1 and counts["queue"] >= 2
                assert "<table" in ins._repr_html_()
    # The accounts really are read-only.
    with (psycopg.connect(roles.reader_url.replace("+psycopg", ""), autocommit=True) as conn,
          pytest.raises(psycopg.errors.InsufficientPrivilege)):
        conn.execute(sql.SQL("DELETE FROM {}.jobs").format(sql.Identifier(private.schema)))
    acl = redis.Redis.from_url(roles.acl_redis_url, decode_responses=True)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            acl.set(keys.prefix(private.namespace) + "x", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            acl.get("{other}:x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            acl.publish(keys.invalidation_channel(private.namespace), "x")
    finally:
        acl.close()


def test_inspector_refusals_name_the_server_and_hide_the_password(private: Private, roles: Roles) -> None:
    with private.manager() as sm:
        _populate(sm)
    # Refusals are setup mistakes (exit 4 in the CLI), not outages: SetupError, a ConfigurationError.
    # A namespace the ACL user may not read: NOPERM, reported without the password.
    with toolkit.Inspector(roles.reader_url, roles.acl_redis_url, namespace="not_mine",
                           schema=private.schema) as ins, pytest.raises(toolkit.errors.SetupError) as info:
        ins.metrics()
    assert "127.0.0.1" in str(info.value)
    _assert_no_secret(info.value, roles.redis_password, roles.pg_password)
    # A wrong Redis password.
    wrong = roles.acl_redis_url.replace(roles.redis_password, "Wr0ng-" + roles.redis_password[::-1])
    with toolkit.Inspector(roles.reader_url, wrong, namespace=private.namespace,
                           schema=private.schema) as ins, pytest.raises(toolkit.errors.SetupError) as info:
        ins.metrics()
    _assert_no_secret(info.value, roles.redis_password, "Wr0ng-")
    # A schema the reader has no USAGE on.
    with toolkit.Inspector(roles.reader_url, roles.acl_redis_url, namespace=private.namespace,
                           schema="pg_toast_nope") as ins, pytest.raises(toolkit.errors.SetupError) as info:
        ins.jobs()
    _assert_no_secret(info.value, roles.pg_password)
    assert roles.pg_password not in repr(ins) and roles.redis_password not in repr(ins)


def test_state_manager_runs_a_full_lifecycle_with_dml_only(private: Private, roles: Roles) -> None:
    with toolkit.init_state_manager(roles.writer_url, private.redis_url, namespace=private.namespace,
                                    schema=private.schema, heartbeat_ttl=1.0) as sm:
        assert roles.pg_password not in repr(sm)
        wf = sm.create_workflow("dml", jobs=[{"name": "a", "priority": 9}, {"name": "b", "depends_on": ["a"]},
                                             {"name": "c", "max_attempts": 1}, {"name": "x"}])
        extra = sm.create_job(wf.id, "late", priority=-5)
        sm.register_worker("w1", queues=["default"])
        sm.heartbeat("w1")
        a = sm.dequeue("w1")
        assert a is not None and a.name == "a"
        sm.start_job(a.id)
        sm.complete_job(a.id, {"ok": True})
        assert sm.get_job(next(j.id for j in sm.list_jobs(workflow_id=wf.id) if j.name == "b")
                          ).status == "queued"  # queued by a's completion
        b = sm.dequeue("w1")
        assert b is not None and b.name in {"b", "c", "x"}
        sm.start_job(b.id)
        sm.fail_job(b.id, "boom", retry=True)  # back in the queue, or failed for good (c)
        assert sm.get_job(b.id).status == ("queued" if b.max_attempts > 1 else "failed")
        x = next(j for j in sm.list_jobs(workflow_id=wf.id, status="queued") if j.id != extra.id)
        sm.cancel_job(x.id)
        sm.assign_job(extra.id, "w1")
        with sm.lock("dml-lock", ttl=5) as lock:
            assert lock.fencing_token >= 1
        assert sm.incr_metric("dml_metric", 2) == 2
        sm.checkpoint_metrics()
        sm.register_worker("w2", queues=["default"])
        sm.heartbeat("w2")
        sm.deregister_worker("w1")  # its assigned job goes back to the queue
        report = sm.rebuild()
        assert_rebuild_loaded_everything(report, private.libpq_url, sm.settings.schema)
        assert sm.check_consistency().ok
        assert sm.repair().ok
        purged = sm.purge(0.0, dry_run=True)
        assert purged is not None
        sm.cancel_workflow(wf.id)
        other = sm.create_workflow("gone", jobs=[{"name": "z"}])
        sm.delete_workflow(other.id)
        assert sm.get_workflow(other.id) is None
        assert sm.check_consistency().ok
    # A second manager (the rebuild path of init_state_manager) with the same role.
    with toolkit.init_state_manager(roles.writer_url, private.redis_url, namespace=private.namespace,
                                    schema=private.schema) as again:
        assert again.get_workflow(wf.id).status == "cancelled"
        assert again.get_metric("dml_metric") == 2
        assert again.check_consistency().ok


def _applied(private: Private) -> list[int]:
    db = Database(private.database_url, private.schema)
    try:
        return migrate.applied(db)
    finally:
        db.dispose()


def test_dml_role_refuses_to_migrate_an_outdated_schema_clearly(private: Private, roles: Roles) -> None:
    latest = migrate.available()[-1][0]
    assert latest >= 2
    # Take the schema back to migration 1 (as the superuser): drop what later ones built.
    with psycopg.connect(private.libpq_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(private.schema)))
    db = Database(private.database_url, private.schema)
    try:
        migrate.upgrade(db, target=1)
    finally:
        db.dispose()
    with psycopg.connect(private.libpq_url, autocommit=True) as conn:  # the DML grants again
        schema, writer = sql.Identifier(private.schema), sql.Identifier(roles.writer)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, writer))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}")
                     .format(schema, writer))
        conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(schema, writer))
    assert _applied(private) == [1]
    with pytest.raises(toolkit.ConfigurationError) as info:
        toolkit.init_state_manager(roles.writer_url, private.redis_url, namespace=private.namespace,
                                   schema=private.schema)
    msg = str(info.value)
    assert private.schema in msg and "DDL" in msg and str(latest) in msg, msg
    assert "permission denied" in msg, msg
    _assert_no_secret(info.value, roles.pg_password)
    assert _applied(private) == [1]  # nothing half-applied


def test_dml_role_refuses_to_create_a_missing_schema_clearly(private: Private, roles: Roles) -> None:
    missing = f"{private.schema}_missing"
    with pytest.raises(toolkit.ConfigurationError) as info:
        toolkit.init_state_manager(roles.writer_url, private.redis_url, namespace=private.namespace,
                                   schema=missing)
    msg = str(info.value)
    assert missing in msg and "DDL" in msg and "permission denied" in msg, msg
    _assert_no_secret(info.value, roles.pg_password)
    with psycopg.connect(private.libpq_url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (missing,)).fetchone()
    assert found is None


def test_a_role_without_usage_on_the_schema_is_a_configuration_error(private: Private, roles: Roles) -> None:
    """Permission denied while reading the schema version is a configuration problem, not an outage."""
    with psycopg.connect(private.libpq_url, autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE USAGE ON SCHEMA {} FROM {}").format(
            sql.Identifier(private.schema), sql.Identifier(roles.writer)))
    with pytest.raises(toolkit.ConfigurationError) as info:
        toolkit.init_state_manager(roles.writer_url, private.redis_url, namespace=private.namespace,
                                   schema=private.schema)
    msg = str(info.value)
    assert private.schema in msg and "permission denied" in msg, msg
    _assert_no_secret(info.value, roles.pg_password)


def test_cli_refusals_are_setup_errors_with_exit_4(private: Private, roles: Roles, capsys) -> None:
    """Permission denied and a wrong password are the setup (exit 4), not an outage (exit 3)."""
    from toolkit import cli

    with private.manager() as sm:
        _populate(sm)
    with psycopg.connect(private.libpq_url, autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE USAGE ON SCHEMA {} FROM {}").format(
            sql.Identifier(private.schema), sql.Identifier(roles.reader)))
    base = ["--namespace", private.namespace, "--schema", private.schema]
    assert cli.main(["inspect", "jobs", "--database-url", roles.reader_url,
                     "--redis-url", roles.acl_redis_url, *base]) == 4
    err = capsys.readouterr().err
    assert "permission denied" in err and "check the role" in err, err
    wrong = roles.acl_redis_url.replace(roles.redis_password, "Wr0ng-" + roles.redis_password[::-1])
    assert cli.main(["inspect", "queue", "--database-url", private.database_url,
                     "--redis-url", wrong, *base]) == 4
    err = capsys.readouterr().err
    assert "check the user and password in the Redis URL" in err, err
    assert roles.pg_password not in err and roles.redis_password not in err and "Wr0ng-" not in err
