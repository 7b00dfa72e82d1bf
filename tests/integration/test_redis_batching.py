"""Batched heartbeats and counters: one Lua call per batch leaves exactly what N commands left."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import toolkit
from tests.conftest import Servers
from toolkit.tiers.redis import client as client_mod
from toolkit.tiers.redis import heartbeats, keys, metrics
from toolkit.tiers.redis.client import Client

NOW = 1_700_000_000.123456
TTL = 2.0


@pytest.fixture
def client(clean: Servers) -> Iterator[Client]:
    """A toolkit Redis client on the test namespace."""
    c = Client(clean.redis_url, namespace=clean.namespace)
    yield c
    c.close()


def _beat(client: Client, ns: str, ids: list[str], now: float, ttl: float = TTL) -> list[Any]:
    pipe = client.pipeline()
    heartbeats.beat(ns, ids, now, ttl, pipe=pipe)
    return list(pipe.execute())


def _beat_by_commands(raw: redis.Redis, ns: str, ids: list[str], now: float, ttl: float) -> None:
    """The reference: the five commands a heartbeat used to be, one worker at a time."""
    pipe = raw.pipeline(transaction=False)
    for wid in ids:
        pipe.set(keys.heartbeat(ns, wid), repr(now), px=max(1, int(ttl * 1000)))
        hist = keys.heartbeat_history(ns, wid)
        pipe.lpush(hist, repr(now))
        pipe.ltrim(hist, 0, heartbeats.HISTORY_LENGTH - 1)
        pipe.pexpire(hist, heartbeats.HISTORY_TTL_MS)
    pipe.zadd(keys.heartbeats(ns), dict.fromkeys(ids, now))
    pipe.execute()


def _namespace_keys(raw: redis.Redis, ns: str) -> set[str]:
    return set(raw.scan_iter(match=keys.namespace_pattern(ns), count=1000))


def test_batched_heartbeat_writes_key_history_and_last_seen(client: Client, raw_redis: redis.Redis,
                                                            clean: Servers) -> None:
    ns = clean.namespace
    ids = ["w1", "w2", "w:3"]
    assert _beat(client, ns, ids, NOW) == [3]  # one script call for the batch
    assert _namespace_keys(raw_redis, ns) == {
        keys.heartbeats(ns), *(keys.heartbeat(ns, w) for w in ids),
        *(keys.heartbeat_history(ns, w) for w in ids)}
    for wid in ids:
        key, hist = keys.heartbeat(ns, wid), keys.heartbeat_history(ns, wid)
        assert raw_redis.type(key) == "string" and raw_redis.get(key) == repr(NOW)
        assert TTL * 1000 - 500 < raw_redis.pttl(key) <= TTL * 1000
        assert raw_redis.type(hist) == "list" and raw_redis.lrange(hist, 0, -1) == [repr(NOW)]
        assert heartbeats.HISTORY_TTL_MS - 5000 < raw_redis.pttl(hist) <= heartbeats.HISTORY_TTL_MS
    assert raw_redis.zrange(keys.heartbeats(ns), 0, -1, withscores=True) == [
        (w, NOW) for w in sorted(ids)]
    assert heartbeats.last_seen(client, ns) == dict.fromkeys(ids, NOW)


def test_batched_heartbeat_ttl_below_a_millisecond_is_one_millisecond(
        client: Client, raw_redis: redis.Redis, clean: Servers) -> None:
    _beat(client, clean.namespace, ["w1"], NOW, ttl=0.0001)
    assert raw_redis.pttl(keys.heartbeat(clean.namespace, "w1")) in (-2, 0, 1)


def test_batched_heartbeat_history_newest_first_and_trimmed(client: Client, raw_redis: redis.Redis,
                                                            clean: Servers) -> None:
    ns = clean.namespace
    times = [NOW + i for i in range(heartbeats.HISTORY_LENGTH + 7)]
    pipe = client.pipeline()
    for t in times:
        heartbeats.beat(ns, ["w1", "w2"], t, TTL, pipe=pipe)
    pipe.execute()
    for wid in ("w1", "w2"):
        hist = raw_redis.lrange(keys.heartbeat_history(ns, wid), 0, -1)
        assert hist == [repr(t) for t in reversed(times)][:heartbeats.HISTORY_LENGTH]
        assert raw_redis.get(keys.heartbeat(ns, wid)) == repr(times[-1])
    assert heartbeats.history(client, ns, ["w1"])["w1"] == times[-heartbeats.HISTORY_LENGTH:]
    assert raw_redis.zscore(keys.heartbeats(ns), "w2") == times[-1]


def test_batched_heartbeat_equals_the_five_commands(client: Client, raw_redis: redis.Redis,
                                                    clean: Servers) -> None:
    ns = clean.namespace
    old = [f"old{i}" for i in range(40)]
    new = [f"new{i}" for i in range(40)]
    for step in range(3):  # history grows; the last-seen time moves
        _beat_by_commands(raw_redis, ns, old, NOW + step * 0.1, 30.0)
        _beat(client, ns, new, NOW + step * 0.1, 30.0)
    for o, n in zip(old, new, strict=True):
        for build in (keys.heartbeat, keys.heartbeat_history):
            assert raw_redis.type(build(ns, o)) == raw_redis.type(build(ns, n))
            assert abs(raw_redis.pttl(build(ns, o)) - raw_redis.pttl(build(ns, n))) < 2000
        assert raw_redis.get(keys.heartbeat(ns, o)) == raw_redis.get(keys.heartbeat(ns, n))
        assert (raw_redis.lrange(keys.heartbeat_history(ns, o), 0, -1)
                == raw_redis.lrange(keys.heartbeat_history(ns, n), 0, -1))
        assert raw_redis.zscore(keys.heartbeats(ns), o) == raw_redis.zscore(keys.heartbeats(ns), n)


def test_batched_heartbeat_over_a_chunk_is_split_and_beats_everyone(
        client: Client, raw_redis: redis.Redis, clean: Servers) -> None:
    ns = clean.namespace
    ids = [f"w{i}" for i in range(2 * heartbeats.BEAT_CHUNK + 17)]
    assert _beat(client, ns, ids, NOW) == [heartbeats.BEAT_CHUNK, heartbeats.BEAT_CHUNK, 17]
    assert raw_redis.zcard(keys.heartbeats(ns)) == len(ids)
    assert raw_redis.exists(*(keys.heartbeat(ns, w) for w in ids)) == len(ids)
    assert raw_redis.exists(*(keys.heartbeat_history(ns, w) for w in ids)) == len(ids)


def test_beat_script_handles_more_members_than_lua_can_unpack(
        client: Client, raw_redis: redis.Redis, clean: Servers) -> None:
    ns = clean.namespace
    ids = [f"w{i}" for i in range(4500)]  # 9,000 ZADD arguments: more than one unpack() holds
    ks = [keys.heartbeats(ns)]
    for wid in ids:
        ks += (keys.heartbeat(ns, wid), keys.heartbeat_history(ns, wid))
    pipe = client.pipeline()
    client_mod.queue_script(pipe, "beat_workers", ks,
                            [repr(NOW), 2000, heartbeats.HISTORY_LENGTH, heartbeats.HISTORY_TTL_MS, *ids])
    assert pipe.execute() == [len(ids)]
    assert raw_redis.zcard(keys.heartbeats(ns)) == len(ids)


def test_batched_heartbeat_of_nobody_sends_nothing(client: Client, clean: Servers,
                                                   raw_redis: redis.Redis) -> None:
    assert _beat(client, clean.namespace, [], NOW) == []
    assert _namespace_keys(raw_redis, clean.namespace) == set()


def test_heartbeat_many_leaves_keys_of_every_worker(sm: toolkit.StateManager, raw_redis: redis.Redis,
                                                    clean: Servers) -> None:
    ns = clean.namespace
    ids = [sm.register_worker(f"p{i}").id for i in range(5)]
    before = [raw_redis.llen(keys.heartbeat_history(ns, w)) for w in ids]  # registering may beat
    sm.heartbeat_many(ids)
    sm.heartbeat_many(ids[:2])
    seen = raw_redis.zrange(keys.heartbeats(ns), 0, -1, withscores=True)
    assert sorted(w for w, _ in seen) == sorted(ids)
    for i, wid in enumerate(ids):
        when = raw_redis.get(keys.heartbeat(ns, wid))
        assert when is not None and float(when) == raw_redis.zscore(keys.heartbeats(ns), wid)
        assert 0 < raw_redis.pttl(keys.heartbeat(ns, wid)) <= sm.settings.heartbeat_ttl * 1000
        assert raw_redis.llen(keys.heartbeat_history(ns, wid)) == before[i] + (2 if i < 2 else 1)
    assert sorted(sm.active_workers()) == sorted(ids)


def test_incr_many_adds_to_totals_and_time_buckets(client: Client, raw_redis: redis.Redis,
                                                   clean: Servers) -> None:
    ns = clean.namespace
    first = {"a": 1, "b": 5, "c": -2}
    assert metrics.incr_many(client, ns, first, NOW) == first
    later = NOW + metrics.BUCKET_SECONDS
    # Returned totals pass through a Lua number (exact up to 2**53, like incr_metric's);
    # the stored total is exact beyond that.
    assert metrics.incr_many(client, ns, {"b": 2**52, "a": 3}, later) == {"b": 5 + 2**52, "a": 4}
    assert metrics.incr(client, ns, "c", 10, later) == 8  # the one-counter script agrees
    metrics.incr_many(client, ns, {"b": 2**53}, later)
    assert raw_redis.hgetall(keys.metrics(ns)) == {"a": "4", "b": str(5 + 2**52 + 2**53), "c": "8"}
    b0, b1 = str(metrics.bucket_start(NOW)), str(metrics.bucket_start(later))
    assert b0 != b1
    assert raw_redis.hgetall(keys.metric_buckets(ns, "a")) == {b0: "1", b1: "3"}
    assert raw_redis.hgetall(keys.metric_buckets(ns, "b")) == {b0: "5", b1: str(2**52 + 2**53)}
    assert raw_redis.hgetall(keys.metric_buckets(ns, "c")) == {b0: "-2", b1: "10"}
    assert _namespace_keys(raw_redis, ns) == {
        keys.metrics(ns), *(keys.metric_buckets(ns, n) for n in "abc")}
    for key in _namespace_keys(raw_redis, ns):
        assert raw_redis.pttl(key) == -1  # like incr_metric: no TTL on totals or buckets
    assert metrics.incr_many(client, ns, {}, NOW) == {}


def test_incr_many_over_a_chunk_counts_every_name_in_order(client: Client, raw_redis: redis.Redis,
                                                           clean: Servers) -> None:
    ns = clean.namespace
    amounts = {f"m{i}": i for i in range(metrics.INCR_CHUNK * 2 + 3)}
    got = metrics.incr_many(client, ns, amounts, NOW)
    assert list(got) == list(amounts) and got == amounts
    assert metrics.totals(client, ns) == {k: v for k, v in amounts.items()}
    bucket = metrics.bucket_start(NOW)
    assert metrics.buckets(client, ns, ["m0", "m2002"]) == {"m0": {bucket: 0}, "m2002": {bucket: 2002}}


def test_incr_many_is_not_resent_after_a_lost_reply(client: Client, clean: Servers,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = metrics.run_script

    def lose_reply(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # the script ran in Redis ...
        raise redis.ConnectionError("connection lost before the reply")  # ... the reply was lost

    monkeypatch.setattr(metrics, "run_script", lose_reply)
    with pytest.raises(toolkit.StorageUnavailable):
        metrics.incr_many(client, clean.namespace, {"a": 1, "b": 2}, NOW)
    monkeypatch.undo()
    assert metrics.totals(client, clean.namespace) == {"a": 1, "b": 2}  # counted once, not twice


def test_incr_metrics_returns_totals_and_fills_buckets(sm: toolkit.StateManager, raw_redis: redis.Redis,
                                                       clean: Servers) -> None:
    names = [f"n{i}" for i in range(100)]
    assert sm.incr_metrics(dict.fromkeys(names, 1)) == dict.fromkeys(names, 1)
    assert sm.incr_metrics({n: i + 1 for i, n in enumerate(names)}) == {
        n: i + 2 for i, n in enumerate(names)}
    assert sm.metrics() == {n: i + 2 for i, n in enumerate(names)}
    for i, n in enumerate(names):
        counts = raw_redis.hgetall(keys.metric_buckets(clean.namespace, n))
        assert sum(int(v) for v in counts.values()) == i + 2
        assert all(int(b) % metrics.BUCKET_SECONDS == 0 for b in counts)


def test_send_packed_sends_every_command_and_returns_each_reply(client: Client,
                                                               raw_redis: redis.Redis,
                                                               clean: Servers) -> None:
    ns = clean.namespace
    a, b, z = keys.entity(ns, "job", "a"), keys.entity(ns, "job", "b\u00e9"), keys.queue(ns, "q")
    replies = client.call("test", lambda: client.send_packed([
        ["MSETNX", a, b"1|{}", b, "2|\u2603"], ["ZADD", z, -4e12 + 7, "j1", 0.5, "j2"],
        ["MSETNX", a, b"9|{}"]]))
    assert replies == [1, 2, 0]
    assert raw_redis.mget([a, b]) == ["1|{}", "2|\u2603"]
    assert raw_redis.zrange(z, 0, -1, withscores=True) == [("j1", -4e12 + 7), ("j2", 0.5)]


BUSY = """local t0 = redis.call('TIME')
repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1e6 + (t[2] - t0[2]) > 200000
return 'late'"""
"""A script that keeps Redis busy for 0.2 s before it answers."""


def test_send_packed_error_reply_raises_and_leaves_the_pool_usable(client: Client,
                                                                   raw_redis: redis.Redis,
                                                                   clean: Servers) -> None:
    k = keys.entity(clean.namespace, "job", "s")
    raw_redis.set(k, "not a sorted set")
    with pytest.raises(toolkit.StorageUnavailable, match="WRONGTYPE"):
        client.call("test", lambda: client.send_packed([["ZADD", k, 1, "m"], ["EVAL", BUSY, 0]]))
    # The script's reply was still on its way when the error was raised: the next command
    # must get its own reply, not that one.
    assert client.call("test", lambda: client.send_packed([["GET", k]])) == ["not a sorted set"]


def test_commands_leave_what_a_redis_py_pipeline_leaves(client: Client, raw_redis: redis.Redis,
                                                        clean: Servers) -> None:
    ns = clean.namespace

    def write(pipe: Any, tag: str) -> None:
        q, e = keys.queue(ns, f"q{tag}"), keys.entity(ns, "job", f"j{tag}")
        pipe.zadd(q, {"a": -4e12 + 7, "b\u00e9": 0.5})
        pipe.zrem(q, "a")
        pipe.set(e, "1|{\"x\": \"\u2603\"}", px=60_000)
        pipe.hset(keys.metrics(ns) + tag, mapping={"n": 3, "f": 0.1})
        metrics.incr_many_on(client, ns, {"jobs_done": 2}, NOW, pipe=pipe)
        pipe.publish(keys.invalidation_channel(ns), b"[]")

    commands = client.commands()
    write(commands, "1")
    assert [c[0] for c in commands.commands] == ["ZADD", "ZREM", "SET", "HSET", "EVALSHA", "PUBLISH"]
    # Redis's own replies (no redis-py reply callbacks: SET answers "OK", not True)
    assert client.call("test", lambda: client.send_commands(commands)) == [2, 1, "OK", 2, [2], 0]
    pipe = client.pipeline()
    write(pipe, "2")
    pipe.execute()
    for k1, k2 in [(keys.queue(ns, "q1"), keys.queue(ns, "q2")),
                   (keys.metrics(ns) + "1", keys.metrics(ns) + "2")]:
        assert raw_redis.dump(k1) == raw_redis.dump(k2), k1
    for tag in "12":
        e = keys.entity(ns, "job", f"j{tag}")
        assert raw_redis.get(e) == "1|{\"x\": \"\u2603\"}" and 0 < raw_redis.pttl(e) <= 60_000
    assert metrics.totals(client, ns) == {"jobs_done": 4}
    assert client.send_commands(client.commands()) == []  # nothing written down: nothing sent


def _probe(client: Client, clean: Servers, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    """Register a script whose text belongs to this test alone (Redis never saw its SHA, as
    after a restart) under the name ``probe``; return its SHA."""
    text = f"-- {clean.namespace} {uuid.uuid4().hex}\n{body}"
    client.scripts["probe"] = client.redis.register_script(text)
    real_sha = client_mod.script_sha
    monkeypatch.setattr(client_mod, "script_sha", lambda name: client.scripts["probe"].sha
                        if name == "probe" else real_sha(name))
    client._scripts_loaded = True  # what the client believes until Redis says NOSCRIPT
    return client.scripts["probe"].sha


def test_a_script_redis_does_not_know_is_loaded_and_run_once(client: Client, raw_redis: redis.Redis,
                                                             clean: Servers,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sha = _probe(client, clean, monkeypatch, "return redis.call('INCR', KEYS[1])")
    k = keys.entity(clean.namespace, "probe", "n")
    assert raw_redis.script_exists(sha) == [False]
    assert client_mod.run_script(client, "probe", [k], []) == 1
    assert raw_redis.get(k) == "1"  # ran once: the NOSCRIPT reply ran nothing
    assert client_mod.run_script(client, "probe", [k], []) == 2


def test_a_write_through_resends_only_the_scripts_redis_did_not_know(
        client: Client, raw_redis: redis.Redis, clean: Servers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted Redis whose connection redis-py replaced quietly: the write's other
    commands ran once, its script calls are loaded and sent again, once."""
    sha = _probe(client, clean, monkeypatch, "return redis.call('INCR', KEYS[1])")
    assert raw_redis.script_exists(sha) == [False]
    ran, counted = keys.entity(clean.namespace, "probe", "ran"), keys.metrics(clean.namespace)
    commands = client.commands()
    commands.set(keys.entity(clean.namespace, "job", "s"), "1|{}")
    client_mod.run_script(client, "probe", [ran], [], pipe=commands)
    commands.hincrby(counted, "writes", 1)
    assert client.call("test", lambda: client.send_commands(commands), idempotent=False) == [
        "OK", 1, 1]
    assert raw_redis.get(ran) == "1" and raw_redis.hget(counted, "writes") == "1"


def test_an_error_reply_raises_and_keeps_the_connection(client: Client, clean: Servers,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _probe(client, clean, monkeypatch, "return redis.error_reply('OOM probe refused')")
    before = client.redis.client_id()
    for _ in range(3):  # the first loads the script after NOSCRIPT; each then answers OOM
        with pytest.raises(redis.ResponseError, match="probe refused"):
            client_mod.run_script(client, "probe", [], [])
    assert client.redis.client_id() == before  # no reconnect (and handshake) per error reply


def test_commands_are_packed_by_hiredis_for_the_values_the_toolkit_sends(client: Client,
                                                              raw_redis: redis.Redis,
                                                              clean: Servers) -> None:
    r, k = client.redis, keys.entity(clean.namespace, "job", "p")
    assert r.client_getname() == "toolkit"  # "CLIENT GETNAME": a name of two words is split
    for value, stored in [(0.1, "0.1"), (1e20, "1e+20"), (2**70, str(2**70)), ("\u00e9", "\u00e9"),
                          (b"\xc3\xa9", "\u00e9"), (bytearray(b"ba"), "ba"),
                          (memoryview(b"mv"), "mv")]:
        r.set(k, value)
        assert raw_redis.get(k) == stored, value
    for bad in (None, True, ["a"]):
        with pytest.raises(redis.DataError):
            r.set(k, bad)
    assert r.get(k) == "mv"  # a refused command sends nothing and leaves the connection usable
