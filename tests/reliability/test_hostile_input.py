"""Hostile input and secrets: refused before any I/O, stored literally, never leaked.

Every refusal must be a ValidationError or ConfigurationError naming the field and
the value, with nothing changed in any tier.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import redis

import toolkit
from tests.conftest import Servers, drop_schema, unique, wipe_namespace
from tests.reliability.conftest import Private, assert_invariants
from toolkit.tiers.memory import KINDS
from toolkit.tiers.redis import keys

CLOSED = "127.0.0.1:1"  # nothing listens on port 1: a refusal must come before a connection


def _tiers(sm: toolkit.StateManager, url: str, libpq_url: str) -> tuple[Any, ...]:
    """Everything in every tier of ``sm``: PostgreSQL rows, Redis keys and values, memory."""
    client = redis.Redis.from_url(url)
    try:
        names = sorted(client.scan_iter(match=keys.namespace_pattern(sm.ns), count=1000))
        rds = {k: client.dump(k) for k in names if b":hb" not in k and b"heartbeats" not in k
               and k != keys.applied(sm.ns).encode()}  # refreshed every second by design
    finally:
        client.close()
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        pg = {t: conn.execute(psycopg.sql.SQL("SELECT * FROM {} ORDER BY 1").format(
            psycopg.sql.Identifier(sm.settings.schema, t))).fetchall()
            for t in ("workflows", "jobs", "workers", "job_assignments")}
    mem = {kind: sorted((e.id, e) for e in sm.memory.all(kind)) for kind in KINDS}
    return pg, rds, mem


# -- ids and namespaces ---------------------------------------------------------------------

GLOBBY = ["*", "?", "[a-z]", "{x}", "a:b", "back\\slash", "job:*", "}:workflow:*", "%", "a b"]


def test_glob_characters_in_ids_are_stored_literally_and_scans_stay_in_their_namespace(
        clean: Servers, make_sm, raw_redis) -> None:
    sm = make_sm()
    other_name = unique("tk_other")
    other = make_sm(namespace=other_name, schema=other_name)
    try:
        other.create_workflow("o", workflow_id="plain", jobs=[{"name": "*", "id": "o*"}])
        for i, wid in enumerate(GLOBBY):
            sm.create_workflow(wid, workflow_id=wid, jobs=[{"name": wid, "id": f"{wid}#{i}"}])
        sm.create_workflow("p", workflow_id="a", jobs=[{"name": "x", "id": "ab"}])
        for i, wid in enumerate(GLOBBY):
            sm.memory.drop("workflow", wid)
            assert sm.get_workflow(wid).name == wid
            assert raw_redis.exists(keys.entity(sm.ns, "workflow", wid))
            assert [j.id for j in sm.list_jobs(workflow_id=wid)] == [f"{wid}#{i}"]
        report = sm.check_consistency()
        assert report.ok and report.checked == 2 * (len(GLOBBY) + 1), report
        sm.delete_workflow("*")
        assert sm.get_workflow("a") is not None and sm.get_workflow("*") is None
        assert all(sm.get_workflow(w) is not None for w in GLOBBY if w != "*")
        assert other.get_workflow("plain") is not None and other.check_consistency().ok
        assert other.check_consistency().checked == 2
        assert_invariants(sm, raw_redis, clean.libpq_url)
    finally:
        wipe_namespace(clean.redis_url, other.ns)
        drop_schema(clean.libpq_url, other_name)


BAD_NAMESPACES = ["wf}x", "a*", "", 'pub"; DROP SCHEMA x', "a:b", "{wf}", "a" * 65, "é", None, 7]
BAD_SCHEMAS = ["wf}x", "a*", "", 'pub"; DROP SCHEMA x', "a" * 64, "Public", "1abc", None]


@pytest.mark.parametrize("field,value", [("namespace", v) for v in BAD_NAMESPACES]
                         + [("schema", v) for v in BAD_SCHEMAS]
                         + [("heartbeat_ttl", v) for v in (0, -1, math.nan, math.inf, "3", True)])
def test_bad_namespace_schema_or_ttl_is_refused_before_any_io(field: str, value: Any) -> None:
    started = time.monotonic()
    with pytest.raises(toolkit.ConfigurationError) as info:
        toolkit.init_state_manager(f"postgresql://u@{CLOSED}/db", f"redis://{CLOSED}/0",
                                   **{field: value})
    assert time.monotonic() - started < 1.0
    assert field in str(info.value) and repr(value)[:40] in str(info.value)


def test_namespaces_that_share_a_prefix_never_see_each_others_keys(clean: Servers, make_sm,
                                                                    raw_redis) -> None:
    a = make_sm(namespace=clean.namespace)
    b = make_sm(namespace=clean.namespace + ".b", schema=clean.schema + "_b")
    c = make_sm(namespace=clean.namespace + "-", schema=clean.schema + "_c")
    try:
        for m in (a, b, c):
            m.create_workflow("w", workflow_id="same", jobs=[{"name": "j", "id": f"j-{m.ns}"}])
            m.incr_metric("hits")
        b.delete_workflow("same")
        assert a.get_workflow("same") is not None and c.get_workflow("same") is not None
        assert a.metrics()["hits"] == 1
        for m in (a, c):
            assert m.check_consistency().ok and m.check_consistency().checked == 2
        for name in raw_redis.scan_iter(match=keys.namespace_pattern(a.ns)):
            assert name.startswith("{" + a.ns + "}:")
    finally:
        for m in (b, c):
            wipe_namespace(clean.redis_url, m.ns)
            drop_schema(clean.libpq_url, m.settings.schema)


# -- payloads, durations --------------------------------------------------------------------

def _deep(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


BAD_PAYLOADS = {
    "nul": {"s": "a\x00b"},
    "bytes": b"raw",
    "set": {1, 2},
    "nan": {"x": math.nan},
    "inf": [math.inf],
    "10MB": "x" * 10_000_000,
    "deep": _deep(10_000),
    "int keys": {1: "a"},
    "object": object(),
}


@pytest.mark.parametrize("kind", sorted(BAD_PAYLOADS))
def test_unstorable_payloads_are_refused_and_change_nothing(sm: toolkit.StateManager, clean: Servers,
                                                            kind: str) -> None:
    bad = BAD_PAYLOADS[kind]
    wf = sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    sm.register_worker("w1")
    sm.dequeue("w1")
    sm.start_job("a")
    before = _tiers(sm, clean.redis_url, clean.libpq_url)
    calls = {
        "jobs[0].payload": lambda: sm.create_workflow("x", jobs=[{"name": "b", "payload": bad}]),
        "metadata": lambda: sm.create_workflow("x", metadata={"m": bad}),
        "payload": lambda: sm.create_job(wf.id, "b", payload=bad),
        "result": lambda: sm.complete_job("a", bad),
    }
    for field, call in calls.items():
        with pytest.raises(toolkit.ValidationError) as info:
            call()
        assert field in str(info.value), (field, str(info.value)[:200])
        assert len(str(info.value)) < 2000  # names the value without echoing 10 MB
    assert _tiers(sm, clean.redis_url, clean.libpq_url) == before


@pytest.mark.parametrize("value", [0, -1, -0.5, math.nan, math.inf, -math.inf, "1", True, None])
def test_bad_ttls_and_timeouts_are_refused(sm: toolkit.StateManager, value: Any) -> None:
    sm.register_worker("w1")
    calls: dict[str, Any] = {
        "ttl": lambda: sm.lock("x", ttl=value),
        "timeout": lambda: sm.dequeue("w1", timeout=value),
        "older_than": lambda: sm.purge(value),
    }
    if value not in (0, None):  # 0 means "try once" for these two
        calls["blocking_timeout"] = lambda: sm.lock("x", blocking_timeout=value)
    for field, call in calls.items():
        if value is None and field in ("ttl", "timeout"):
            continue
        if value == 0 and field in ("timeout", "older_than"):
            continue
        with pytest.raises(toolkit.ValidationError) as info:
            call()
        assert field in str(info.value) and repr(value) in str(info.value), str(info.value)
    lock = sm.lock("y", ttl=5)
    assert lock.acquire(blocking=False)
    if value is not None:
        with pytest.raises(toolkit.ValidationError):
            lock.extend(value)
    assert lock.owned()
    lock.release()


# -- lock misuse ----------------------------------------------------------------------------

def test_lock_misuse_raises_lock_not_owned_and_never_frees_another_owner(
        sm: toolkit.StateManager, raw_redis) -> None:
    never = sm.lock("m")
    with pytest.raises(toolkit.LockNotOwned):
        never.release()
    with pytest.raises(toolkit.LockNotOwned):
        never.extend()
    first = sm.lock("m", ttl=0.3)
    assert first.acquire(blocking=False)
    first.release()
    with pytest.raises(toolkit.LockNotOwned):
        first.release()  # double release
    short = sm.lock("m", ttl=0.2)
    assert short.acquire(blocking=False)
    time.sleep(0.4)
    holder = sm.lock("m", ttl=10)
    assert holder.acquire(blocking=False)
    with pytest.raises(toolkit.LockNotOwned):
        short.extend(10)  # extend after expiry
    with pytest.raises(toolkit.LockNotOwned):
        short.release()
    assert raw_redis.get(keys.lock(sm.ns, "m")) == holder.token
    forged = sm.lock("m")
    forged._token = "not-the-owner"  # a guessed token
    with pytest.raises(toolkit.LockNotOwned):
        forged.release()
    assert holder.owned()
    holder.release()


# -- secrets --------------------------------------------------------------------------------

PASSWORD = "p@ss:w/rd%40ü-S3cr3t"
SECRET_FORMS = (PASSWORD, quote(PASSWORD, safe=""), "S3cr3t", quote("ü"))


def _leaks(text: str) -> list[str]:
    return [s for s in SECRET_FORMS if s in text]


def test_password_never_appears_in_reprs_errors_logs_cli_or_frames(
        private: Private, caplog: pytest.LogCaptureFixture) -> None:
    user = "tk_secret"
    admin = private.raw_redis()
    admin.execute_command("ACL", "SETUSER", user, "on", f">{PASSWORD}", "~*", "&*", "+@all")
    enc = quote(PASSWORD, safe="")
    pg_port, rd_port = private.stack.pg_port, private.stack.redis_port
    db_url = f"postgresql://postgres:{enc}@127.0.0.1:{pg_port}/postgres"  # trust auth: accepted
    rd_url = f"redis://{user}:{enc}@127.0.0.1:{rd_port}/0"
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)
    try:
        with toolkit.init_state_manager(db_url, rd_url, namespace=private.namespace,
                                        schema=private.schema) as sm:
            wf = sm.create_workflow("w", jobs=[{"name": "a"}])
            sm.incr_metric("m")
            seen += [repr(sm), str(sm), repr(sm.settings), repr(sm.db), repr(sm.redis),
                     repr(sm.inspector)]
            for frame in (sm.inspector.workflows(), sm.inspector.jobs(), sm.inspector.summary(),
                          sm.check_consistency().to_frame()):
                seen.append(frame.to_string())
                seen.append(frame.to_csv())
            assert sm.get_workflow(wf.id) is not None
        failing = [
            (f"postgresql://postgres:{enc}@127.0.0.1:1/postgres", rd_url, "127.0.0.1:1"),
            (db_url, f"redis://{user}:{enc}@127.0.0.1:1/0", "127.0.0.1:1"),
            (db_url, f"redis://{user}:wrong{enc}@127.0.0.1:{rd_port}/0", f"127.0.0.1:{rd_port}"),
            (f"mysql://root:{enc}@127.0.0.1:3306/x", rd_url, "database_url"),
            (db_url, f"http://u:{enc}@127.0.0.1:80/", "redis_url"),
        ]
        for db, rd, where in failing:
            with pytest.raises(toolkit.ToolkitError) as info:
                toolkit.init_state_manager(db, rd, namespace=private.namespace,
                                           schema=private.schema)
            assert where in str(info.value), str(info.value)
            seen += [str(info.value), repr(info.value)]
            cause = info.value.__cause__
            while cause is not None:  # the chained driver error is printed in tracebacks too
                seen.append(str(cause))
                cause = cause.__cause__
        env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": rd_url}
        for argv in (["inspect", "workflows", "--format", "csv"], ["check"], ["-v", "check"],
                     ["inspect", "jobs", "--redis-url", f"redis://{user}:{enc}@127.0.0.1:1/0"]):
            args = [*argv[:2], "--namespace", private.namespace, "--schema", private.schema,
                    *argv[2:]] if argv[0] != "-v" else [
                "-v", "check", "--namespace", private.namespace, "--schema", private.schema]
            out = subprocess.run([sys.executable, "-m", "toolkit", *args], env=env,
                                 capture_output=True, text=True, timeout=60)
            seen += [out.stdout, out.stderr]
        assert any(f"127.0.0.1:{pg_port}" in s or f"127.0.0.1:{rd_port}" in s or "127.0.0.1:1" in s
                   for s in seen)
        for record in caplog.records:
            seen.append(record.getMessage())
            if record.exc_info:
                seen.append(logging.Formatter().formatException(record.exc_info))
        leaks = [(s[:300], _leaks(s)) for s in seen if _leaks(s)]
        assert not leaks, leaks
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def test_package_source_has_no_pickle_or_eval_of_data() -> None:
    root = Path(toolkit.__file__).parent
    banned = re.compile(r"\bpickle\b|\bcPickle\b|\bmarshal\b|\bshelve\b|(?<![\w.])eval\(|"
                        r"(?<![\w.])exec\(|yaml\.load\(|yaml\.unsafe_load")
    hits = []
    for path in sorted(root.rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if banned.search(line):
                hits.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not hits, hits


# -- corrupt cache values -------------------------------------------------------------------

FOREIGN = ["garbage", "", "7", "1|{not json", "1|[]", '1|{"id": "a"}', "99999|{not json",
           '99999|{"hacked": true}', "\x00\xff"]


@pytest.mark.parametrize("value", FOREIGN)
def test_corrupt_or_foreign_cache_value_is_a_miss_and_is_repaired(sm: toolkit.StateManager,
                                                                  raw_redis, clean: Servers,
                                                                  value: str) -> None:
    sm.create_workflow("w", workflow_id="w", jobs=[{"name": "a", "id": "a"}])
    truth = sm.get_job("a")
    raw_redis.set(keys.entity(sm.ns, "job", "a"), value)
    sm.memory.drop("job", "a")
    assert sm.get_job("a") == truth  # a miss, answered from PostgreSQL
    sm.repair()
    assert sm.check_consistency().ok
    other = sm.inspector  # a fresh reader must see the truth in Redis now
    assert other is not None
    sm.memory.drop("job", "a")
    assert sm.get_job("a") == truth
    assert raw_redis.get(keys.entity(sm.ns, "job", "a")).startswith(f"{truth.version}|")
    assert_invariants(sm, raw_redis, clean.libpq_url)
