"""Ambiguous Redis timeouts (a stalled Redis) and a lock holder paused past its TTL.

Issue 7, cases 3 and 4. The stall is a real busy Lua script on the *private* Redis,
so the shared server is never stalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import Private, inflight_ids, queue_census
from toolkit import config
from toolkit.tiers.redis import keys

BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
  local n = redis.call('TIME')
until n[1] * 1000000 + n[2] - start >= tonumber(ARGV[1])
return 1
"""
STALL_S = 1.0
TIMEOUT_S = 0.3


def _stall(redis_url: str, seconds: float = STALL_S) -> threading.Thread:
    """Start a busy Lua script of ``seconds`` on another connection; return its thread."""
    ready = threading.Event()

    def run() -> None:
        client = redis.Redis.from_url(redis_url, socket_timeout=30)
        try:
            client.ping()
            ready.set()
            client.eval(BUSY, 0, int(seconds * 1_000_000))
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    time.sleep(0.1)  # the script is running now
    return thread


@pytest.fixture
def stalled_sm(private: Private) -> Iterator[toolkit.StateManager]:
    """A StateManager on the private pair whose Redis socket timeout is 0.3 s."""
    sm = private.manager()
    pool = sm.redis.redis.connection_pool
    pool.connection_kwargs["socket_timeout"] = TIMEOUT_S
    pool.disconnect()
    try:
        yield sm
    finally:
        sm.close()


def test_default_redis_py_retry_counts_an_incr_twice_after_a_timeout(private: Private) -> None:
    """The reproduction: why the toolkit must never let redis-py re-send INCR."""
    # The constructor's default retry policy (from_url builds connections without it).
    raw = redis.Redis(host="127.0.0.1", port=private.stack.redis_port, socket_timeout=TIMEOUT_S)
    assert raw.get_retry().get_retries() > 0
    check = private.raw_redis()
    key = f"{{{private.namespace}}}:repro"
    try:
        raw.ping()
        stall = _stall(private.redis_url)
        with contextlib.suppress(redis.RedisError):  # retries may run out: it was re-sent anyway
            raw.incr(key)
        stall.join(10)
        time.sleep(0.2)
        assert int(check.get(key)) >= 2  # one INCR asked for, counted twice or more
    finally:
        raw.close()
        check.delete(key)
        check.close()


def test_incr_metric_during_a_stall_counts_once_or_raises(stalled_sm: toolkit.StateManager,
                                                         private: Private) -> None:
    sm = stalled_sm
    stall = _stall(private.redis_url)
    try:
        total: int | None = sm.incr_metric("m")
    except toolkit.StorageUnavailable:
        total = None
    stall.join(10)
    time.sleep(0.2)
    value = sm.get_metric("m")
    if total is not None:
        assert total == value == 1
    assert value <= 1, f"one incr_metric counted {value} times"
    raw = private.raw_redis()
    try:
        buckets = raw.hgetall(keys.metric_buckets(private.namespace, "m"))
        assert sum(int(v) for v in buckets.values()) == value
    finally:
        raw.close()
    sm.repair()
    assert sm.check_consistency().ok
    assert sm.incr_metric("m") == value + 1


def test_dequeue_during_a_stall_never_pops_two_jobs(stalled_sm: toolkit.StateManager,
                                                   private: Private) -> None:
    sm = stalled_sm
    sm.claim_lease = 1.0
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(3)])
    sm.register_worker("w1")
    stall = _stall(private.redis_url)
    try:
        got = sm.dequeue("w1")
    except toolkit.StorageUnavailable:
        got = None
    stall.join(10)
    time.sleep(0.2)
    raw = private.raw_redis()
    try:
        census = queue_census(raw, private.namespace)
        flying = inflight_ids(raw, private.namespace)
        popped = {f"j{i}" for i in range(3)} - set(census)
        assert len(popped) <= 1, f"one dequeue popped {sorted(popped)}"
        assert len(sm.list_assignments()) == (0 if got is None else 1)
        # Nothing is lost: the popped job comes back within its lease.
        seen: list[str] = [] if got is None else [got.id]
        deadline = time.monotonic() + 8
        while len(seen) < 3 and time.monotonic() < deadline:
            job = sm.dequeue("w1", timeout=0.2)
            if job is not None:
                seen.append(job.id)
        assert sorted(seen) == ["j0", "j1", "j2"], (seen, census, flying)
        assert len(sm.list_assignments()) == 3
    finally:
        raw.close()


def test_lock_acquire_timing_out_leaves_no_unreleasable_lock(stalled_sm: toolkit.StateManager,
                                                            private: Private) -> None:
    sm = stalled_sm
    lock = sm.lock("L", ttl=30)
    stall = _stall(private.redis_url)
    try:
        acquired = lock.acquire(blocking=False)
    except toolkit.StorageUnavailable:
        acquired = False
    stall.join(10)
    time.sleep(0.2)
    raw = private.raw_redis()
    try:
        holder = raw.get(keys.lock(private.namespace, "L"))
        if holder is not None:
            assert holder == lock.token, "a lock is held by a token its owner never learned"
            lock.release()
        elif not acquired:
            with pytest.raises(toolkit.LockNotOwned):
                lock.release()
        assert raw.get(keys.lock(private.namespace, "L")) is None
        other = sm.lock("L", ttl=5)
        assert other.acquire(blocking=False)  # not left locked for 30 s
        other.release()
    finally:
        raw.close()


HOLDER = r"""
import json, sys, toolkit
ns, schema = sys.argv[1], sys.argv[2]
sm = toolkit.init_state_manager(namespace=ns, schema=schema, rebuild=False)
lock = sm.lock("res", ttl=1.0)
assert lock.acquire(blocking=False)
print(json.dumps({"fence": lock.fencing_token, "token": lock.token}), flush=True)
sys.stdin.readline()
out = {}
for name in ("extend", "release"):
    try:
        getattr(lock, name)()
        out[name] = "ok"
    except toolkit.LockNotOwned:
        out[name] = "LockNotOwned"
print(json.dumps(out), flush=True)
sm.close()
"""


def test_paused_lock_holder_cannot_extend_or_release_after_its_ttl(clean: Servers,
                                                                  make_sm) -> None:
    env = {**os.environ, config.DATABASE_URL_VAR: clean.database_url,
           config.REDIS_URL_VAR: clean.redis_url}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, clean.namespace, clean.schema],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdin is not None
        first = json.loads(child.stdout.readline())
        child.send_signal(signal.SIGSTOP)
        time.sleep(1.4)  # past the 1 s TTL while the holder cannot run
        sm = make_sm()
        lock = sm.lock("res", ttl=10)
        assert lock.acquire(blocking=False), "the expired lock could not be taken"
        assert lock.fencing_token > first["fence"]
        child.send_signal(signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        stale = json.loads(child.stdout.readline())
        assert stale == {"extend": "LockNotOwned", "release": "LockNotOwned"}
        assert lock.owned(), "the stale holder released or stole the new holder's lock"
        lock.release()
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait(timeout=10)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
