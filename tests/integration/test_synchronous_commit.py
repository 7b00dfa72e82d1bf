"""The opt-in ``synchronous_commit="off"`` mode (issue 18): every session of the state layer
sets PostgreSQL's ``synchronous_commit = off``; the default leaves the server's setting alone.

What the mode can lose is documented on ``init_state_manager``; here, that it is applied on
both pools (the transactions' and the single statements'), that the default is untouched,
that bad input is refused before anything is created, and that the one-commit-per-job loop
works and its commits are seen at once by another session.
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

import toolkit
from tests.conftest import Servers, unique
from toolkit import compare, errors
from toolkit.tiers.redis import keys

_SETTING = sa.text("SELECT setting, source FROM pg_settings WHERE name = 'synchronous_commit'")


def _per_pool(sm: toolkit.StateManager) -> list[tuple[str, str]]:
    """``(setting, source)`` of ``synchronous_commit`` on a connection of each pool."""
    out = []
    for engine in sm.db.engines:
        with engine.connect() as conn:
            setting, source = conn.execute(_SETTING).one()
            out.append((str(setting), str(source)))
    return out


def test_the_opt_in_turns_synchronous_commit_off_in_every_session(make_sm: Any) -> None:
    fast = make_sm(synchronous_commit="off")
    assert _per_pool(fast) == [("off", "session"), ("off", "session")]
    assert "synchronous_commit='off'" in repr(fast.settings)


def test_the_default_leaves_the_servers_setting_alone(sm: toolkit.StateManager) -> None:
    pools = _per_pool(sm)
    assert len(pools) == 2
    assert all(source != "session" for _, source in pools), pools
    assert sm.settings.synchronous_commit == "on"
    assert "synchronous_commit" not in repr(sm.settings)


@pytest.mark.parametrize("bad", [False, "OFF", "local", None])
def test_a_setting_other_than_on_or_off_is_refused_before_anything_is_created(
        clean: Servers, raw_pg: psycopg.Connection, bad: Any) -> None:
    schema = unique("sc_bad")
    with pytest.raises(errors.ConfigurationError, match="synchronous_commit"):
        toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=schema,
                                   schema=schema, synchronous_commit=bad)
    found = raw_pg.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchall()
    assert found == []


def test_the_one_commit_loop_runs_and_its_commits_are_seen_at_once(
        make_sm: Any, raw_pg: psycopg.Connection, clean: Servers) -> None:
    fast = make_sm(synchronous_commit="off")
    worker = fast.register_worker("w-async").id
    wf = fast.create_workflow("async", jobs=[{"name": f"j{i}"} for i in range(6)])
    count = sql.SQL("SELECT status, count(*) FROM {} WHERE workflow_id = %s GROUP BY status"
                    ).format(sql.Identifier(clean.schema, "jobs"))
    job = fast.dequeue(worker, start=True)
    done = []
    while job is not None:
        finished, job = fast.complete_and_dequeue(job.id, {"ok": True}, worker_id=worker,
                                                  start=True)
        done.append(finished.id)
        statuses = dict(raw_pg.execute(count, (wf.id,)).fetchall())
        assert statuses.get("completed") == len(done), statuses  # seen by another session
    assert len(done) == 6
    assert fast.get_workflow(wf.id).status.value == "completed"


def test_an_async_coordinator_is_noted_in_redis_and_the_first_ones_start_is_kept(
        sm: toolkit.StateManager, make_sm: Any, raw_redis: Any) -> None:
    assert raw_redis.exists(keys.async_commits(sm.ns)) == 0  # the default notes nothing
    make_sm(synchronous_commit="off")
    noted = float(raw_redis.get(keys.async_commits(sm.ns)))
    make_sm(synchronous_commit="off")  # the first one's start is kept
    assert float(raw_redis.get(keys.async_commits(sm.ns))) == noted


def test_after_a_crash_recovery_a_fast_start_rebuilds_in_full_when_commits_were_async(
        make_sm: Any, raw_redis: Any, raw_pg: psycopg.Connection, clean: Servers) -> None:
    fast = make_sm(synchronous_commit="off")
    fast.create_workflow("async", jobs=[{"name": "a"}])
    ns = fast.ns
    token = raw_redis.get(keys.crash_token(ns))
    sentinel = sql.SQL("SELECT namespace, token FROM {}").format(
        sql.Identifier(clean.schema, "crash_sentinel"))
    assert raw_pg.execute(sentinel).fetchall() == [(ns, token)]  # the rebuild wrote both
    # No crash since the last rebuild: the fast start is safe.
    assert make_sm(rebuild="fast").last_fast_start is not None
    assert fast.check_consistency().warnings == ()
    # What a crash recovery does to the UNLOGGED sentinel (a real crash:
    # tests/reliability/test_async_commit_crash.py): emptied.
    raw_pg.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(clean.schema, "crash_sentinel")))
    # The coordinator that ran on through it is told what its caches may hold, and so is an
    # operator's read-only Inspector.
    assert fast.check_consistency().warnings == (compare.CRASH_WARNING,)
    ins = toolkit.Inspector(clean.database_url, clean.redis_url, namespace=ns,
                            schema=clean.schema)
    try:
        assert ins.check_consistency().warnings == (compare.CRASH_WARNING,)
    finally:
        ins.close()
    after = make_sm(rebuild="fast")
    assert after.last_fast_start is None  # the full rebuild ran, and wrote a new token
    assert fast.check_consistency().warnings == ()
    renewed = raw_redis.get(keys.crash_token(ns))
    assert renewed != token and raw_pg.execute(sentinel).fetchall() == [(ns, renewed)]
    # The same crash with no coordinator ever committing asynchronously: fast start.
    raw_redis.delete(keys.async_commits(ns))
    raw_pg.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(clean.schema, "crash_sentinel")))
    assert make_sm(rebuild="fast").last_fast_start is not None


def test_an_async_coordinator_notes_itself_again_after_redis_lost_the_note(
        make_sm: Any, raw_redis: Any) -> None:
    fast = make_sm(synchronous_commit="off")
    raw_redis.delete(keys.async_commits(fast.ns))  # as a Redis that lost its data
    deadline = time.monotonic() + 5
    while raw_redis.exists(keys.async_commits(fast.ns)) == 0:
        assert time.monotonic() < deadline, "the note never came back"
        time.sleep(0.1)



def test_a_rebuild_after_a_crash_puts_back_what_postgres_kept_even_at_a_reissued_version(
        make_sm: Any, raw_redis: Any, raw_pg: psycopg.Connection, clean: Servers) -> None:
    fast = make_sm(synchronous_commit="off")
    ahead, reissued = fast.create_workflow("ahead"), fast.create_workflow("reissued")
    for wf in (ahead, reissued):
        assert fast.update_workflow_status(wf.id, "running").version == 2  # in Redis: v2 running
    # The crash lost both commits (PostgreSQL is back at v1, pending); then a coordinator
    # that ran on made another change to the second one, and PostgreSQL issued v2 again.
    table = sql.Identifier(clean.schema, "workflows")
    raw_pg.execute(sql.SQL("UPDATE {} SET status = 'pending', version = 1 WHERE id = ANY(%s)"
                           ).format(table), ([ahead.id, reissued.id],))
    raw_pg.execute(sql.SQL("UPDATE {} SET status = 'cancelled', version = 2 WHERE id = %s"
                           ).format(table), (reissued.id,))
    raw_pg.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(clean.schema, "crash_sentinel")))

    after = make_sm()  # the full rebuild
    for wf, status, version in ((ahead, "pending", 1), (reissued, "cancelled", 2)):
        cached = raw_redis.get(keys.entity(after.ns, "workflow", wf.id))
        assert cached.split("|", 1)[0] == str(version)
        assert json.loads(cached.split("|", 1)[1])["status"] == status, (wf.name, cached)
        assert after.get_workflow(wf.id).status.value == status
    assert after.check_consistency().ok


def test_after_a_crash_under_async_commits_check_exits_1_and_repair_runs_the_rebuild(
        make_sm: Any, raw_redis: Any, raw_pg: psycopg.Connection, clean: Servers,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.integration.test_cli import base
    from toolkit import cli

    fast = make_sm(synchronous_commit="off")
    fast.create_workflow("async", jobs=[{"name": "a"}])
    assert cli.main(["check", *base(clean)]) == 0
    token = raw_redis.get(keys.crash_token(fast.ns))
    raw_pg.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(clean.schema, "crash_sentinel")))
    assert cli.main(["check", *base(clean)]) == 1  # every entity agrees, yet lost commits may hide
    assert "PostgreSQL crashed after the last rebuild" in capsys.readouterr().out
    report = fast.repair()
    assert report.postgres_crashed and report.ok  # found by the warning alone ...
    assert raw_redis.get(keys.crash_token(fast.ns)) not in (None, token)  # ... the rebuild ran
    assert not fast.check_consistency().postgres_crashed
    assert cli.main(["check", *base(clean)]) == 0


def _during_rebuild(monkeypatch: pytest.MonkeyPatch, *steps: Any) -> None:
    """Run ``steps[i]()`` inside the i-th rebuild from now, after its crash sentinel step."""
    from toolkit.recovery import rebuilding

    scan, left = rebuilding._scan_cache, list(steps)

    def scan_then_step(*args: Any) -> Any:
        if left:
            left.pop(0)()
        return scan(*args)

    monkeypatch.setattr(rebuilding, "_scan_cache", scan_then_step)


class _Sentinel(NamedTuple):
    """An async coordinator, its crash sentinel table and the token its rebuild left."""

    sm: toolkit.StateManager
    table: sql.Identifier
    token: str


def _sentinel(make_sm: Any, raw_redis: Any, clean: Servers) -> _Sentinel:
    fast = make_sm(synchronous_commit="off")
    return _Sentinel(fast, sql.Identifier(clean.schema, "crash_sentinel"),
                     raw_redis.get(keys.crash_token(fast.ns)))


def _crash(raw_pg: psycopg.Connection, table: sql.Identifier) -> None:
    """What a crash recovery does to the UNLOGGED sentinel: empties it."""
    raw_pg.execute(sql.SQL("TRUNCATE {}").format(table))


def _held(raw_pg: psycopg.Connection, table: sql.Identifier) -> list[tuple[str]]:
    return raw_pg.execute(sql.SQL("SELECT token FROM {}").format(table)).fetchall()


def test_rebuilds_with_no_crash_keep_the_token_and_overlap_without_a_warning(
        make_sm: Any, raw_redis: Any, raw_pg: psycopg.Connection, clean: Servers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast, table, token = _sentinel(make_sm, raw_redis, clean)
    seen: list[tuple[str, ...]] = []
    # A second coordinator starts (its rebuild) while this one rebuilds, and is checked
    # while its own rebuild runs: no crash happened, so no warning at any point.
    _during_rebuild(monkeypatch, lambda: make_sm(synchronous_commit="off"),
                    lambda: seen.append(fast.check_consistency().warnings))
    fast.rebuild(progress=False)
    assert seen == [()]
    assert fast.check_consistency().warnings == ()
    assert raw_redis.get(keys.crash_token(fast.ns)) == token  # neither rebuild renewed it
    assert _held(raw_pg, table) == [(token,)]


def test_a_rebuild_does_not_publish_a_token_a_later_rebuild_wrote_after_a_crash(
        make_sm: Any, raw_redis: Any, raw_pg: psycopg.Connection, clean: Servers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast, table, token = _sentinel(make_sm, raw_redis, clean)

    def crash_then_a_later_rebuild_begins() -> None:
        _crash(raw_pg, table)
        raw_pg.execute(sql.SQL("INSERT INTO {} VALUES (%s, 'later')").format(table), (fast.ns,))

    # This rebuild saw no crash; one happened while it ran, and a rebuild that began later
    # saw it. Ending first, this one must not hand Redis the later one's token: the crash
    # stays visible until that rebuild (or another) has repaired it.
    _during_rebuild(monkeypatch, crash_then_a_later_rebuild_begins)
    fast.rebuild(progress=False)
    assert raw_redis.get(keys.crash_token(fast.ns)) == token
    assert fast.check_consistency().warnings == (compare.CRASH_WARNING,)
    monkeypatch.undo()
    fast.rebuild(progress=False)  # the next rebuild repairs it and renews both
    assert raw_redis.get(keys.crash_token(fast.ns)) not in (token, "later")
    assert fast.check_consistency().warnings == ()


def test_a_rebuild_that_dies_repairing_a_crash_leaves_the_crash_visible(
        make_sm: Any, raw_redis: Any, raw_pg: psycopg.Connection, clean: Servers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast, table, token = _sentinel(make_sm, raw_redis, clean)
    _crash(raw_pg, table)
    # A coordinator's rebuild renews the token, having seen the crash, and dies before the
    # end: its mark stays in Redis for up to an hour, and it repaired nothing.

    def killed() -> None:
        raise RuntimeError("killed mid-rebuild")

    _during_rebuild(monkeypatch, killed)
    with pytest.raises(RuntimeError, match="killed mid-rebuild"):
        fast.rebuild(progress=False)
    assert raw_redis.exists(keys.rebuilding(fast.ns)) == 1
    renewed = _held(raw_pg, table)
    assert renewed != [] and renewed != [(token,)]
    assert fast.check_consistency().warnings == (compare.CRASH_WARNING,)

    # A crash while a rebuild that saw none runs (its mark in Redis): said as well.
    fast.rebuild(progress=False)
    assert fast.check_consistency().warnings == ()
    raw_redis.set(keys.rebuilding(fast.ns), "a rebuild that saw no crash")
    _crash(raw_pg, table)
    assert fast.check_consistency().warnings == (compare.CRASH_WARNING,)
