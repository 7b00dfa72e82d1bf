"""Invalidations lost on the way: no coordinator serves a stale entity past the bound (issue 17, item 1).

Injected for real: (1) the reader's subscription connection killed from outside
(``CLIENT KILL ADDR`` of this process's own pub/sub sockets on the shared
Redis, nothing else) while another coordinator writes; (2) Redis killed and
restarted (the private server) while another coordinator writes; (3) a reader
process frozen (SIGSTOP) while the channel carries more than the reader's kernel
buffer and a tiny pub/sub output buffer (``client-output-buffer-limit pubsub
2kb``) hold, so Redis drops the reader's subscription, as it drops any
subscriber that falls that far behind; then another coordinator writes. Checked: the time from
the write's return until the reader answers with the new version, and that it
never answers with the old one afterwards. The bound: ``DETECTED_BOUND_S`` after
a disconnect the listener can see, ``StateManager.memory_max_age`` in any case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import redis

import toolkit
import toolkit.state
from tests.conftest import Servers, drop_schema, unique
from tests.reliability.conftest import Private
from tests.reliability.private_redis import redis_server
from toolkit import config
from toolkit.faults import TcpProxy
from toolkit.recovery import invalidation
from toolkit.tiers.redis import keys

DETECTED_BOUND_S = 1.0
"""A disconnect the listener sees: POLL (0.25 s) plus the time to empty memory, with margin."""


def _own_pubsub_addresses(sm: toolkit.StateManager) -> list[str]:
    """Client addresses (as CLIENT LIST shows them) of ``sm``'s in-use Redis connections."""
    pool = sm.redis.redis.connection_pool
    out = []
    for conn in list(pool._in_use_connections):
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            host, port = sock.getsockname()[:2]
            out.append(f"{host}:{port}")
    return out


def _kill_subscriptions(raw: redis.Redis, sm: toolkit.StateManager) -> int:
    """CLIENT KILL the pub/sub connections of ``sm`` (and only those); return how many."""
    mine = set(_own_pubsub_addresses(sm))
    subscribers = {c["addr"] for c in raw.client_list(_type="pubsub")}
    killed = 0
    for addr in sorted(mine & subscribers):
        killed += int(raw.execute_command("CLIENT", "KILL", "ADDR", addr, "SKIPME", "yes"))
    return killed


def _staleness(read: Callable[[], str], fresh: str, since: float, *, limit: float = 10.0,
               hold: float = 1.0) -> float:
    """Seconds from ``since`` until ``read()`` returns ``fresh``; then it must stay fresh."""
    while read() != fresh:
        assert time.monotonic() - since < limit, f"still stale after {limit}s"
        time.sleep(0.01)
    seen = time.monotonic() - since
    until = time.monotonic() + hold
    while time.monotonic() < until:
        assert read() == fresh, "stale again after it was fresh"
        time.sleep(0.02)
    return seen


def test_a_killed_subscription_while_another_coordinator_writes_is_not_served_stale(
        make_sm: Callable[..., toolkit.StateManager], raw_redis: redis.Redis) -> None:
    reader, writer = make_sm(), make_sm()
    writer.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}])
    writer.create_workflow("gone", workflow_id="gone")
    for _ in range(3):
        assert reader.get_job("a").status == "queued" and reader.get_workflow("gone") is not None
    assert reader.memory.get("job", "a") is not None  # served from memory from now on
    assert _kill_subscriptions(raw_redis, reader) >= 1
    writer.cancel_job("a")  # published while the reader is not subscribed
    writer.delete_workflow("gone")
    wrote = time.monotonic()
    seen = _staleness(lambda: reader.get_job("a").status, "cancelled", wrote)
    print(f"\nstale for {seen:.3f}s after a killed subscription")
    assert seen <= DETECTED_BOUND_S
    assert reader.get_workflow("gone") is None  # a deleted entity is not served either
    again = writer.update_workflow_status("wf", "cancelled")  # heard normally once back
    time.sleep(0.5)
    assert reader.get_workflow("wf") == again


def test_a_redis_restart_while_another_coordinator_writes_is_not_served_stale(
        private: Private) -> None:
    reader, writer = private.manager(), private.manager()
    try:
        writer.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}])
        assert reader.get_job("a").status == "queued"
        assert reader.memory.get("job", "a") is not None
        private.stack.kill_redis()
        writer.cancel_job("a")  # committed; its publish is lost with Redis
        wrote = time.monotonic()
        private.stack.restart_redis()
        seen = _staleness(lambda: reader.get_job("a").status, "cancelled", wrote)
        print(f"\nstale for {seen:.3f}s across a Redis restart")
        assert seen <= DETECTED_BOUND_S
    finally:
        reader.close()
        writer.close()


READER = """
import sys, toolkit
sm = toolkit.init_state_manager(namespace=sys.argv[1], schema=sys.argv[1], rebuild=False)
for line in sys.stdin:
    print(sm.get_job(line.strip()).status, flush=True)
"""


def test_a_frozen_reader_dropped_by_a_full_pubsub_buffer_is_not_served_stale(
        servers: Servers) -> None:
    name = unique("tk_lost")
    with redis_server("--client-output-buffer-limit", "pubsub", "2kb", "1kb", "1") as rd:
        writer = toolkit.init_state_manager(servers.database_url, rd.url, namespace=name,
                                            schema=name)
        env = {**os.environ, config.DATABASE_URL_VAR: servers.database_url,
               config.REDIS_URL_VAR: rd.url}
        child = subprocess.Popen([sys.executable, "-c", READER, name], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdin is not None and child.stdout is not None

        def read() -> str:
            child.stdin.write("a\n")  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
            return child.stdout.readline().strip()  # type: ignore[union-attr]

        try:
            writer.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}])
            assert read() == "queued" and read() == "queued"
            child.send_signal(signal.SIGSTOP)
            channel = keys.invalidation_channel(name)
            with rd.raw() as admin:  # traffic the frozen reader cannot take: Redis drops it
                for _ in range(400):
                    admin.publish(channel, "padding|" + "x" * 65536)
                    if admin.pubsub_numsub(channel)[0][1] <= 1:
                        break
                assert admin.pubsub_numsub(channel)[0][1] <= 1, "Redis kept the frozen subscriber"
            writer.cancel_job("a")  # the frozen reader is not subscribed any more: lost
            wrote = time.monotonic()
            child.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            seen = _staleness(read, "cancelled", resumed)
            print(f"\nstale for {seen:.3f}s after the frozen reader resumed "
                  f"({resumed - wrote:.2f}s after the write)")
            assert seen <= DETECTED_BOUND_S
        finally:
            child.kill()
            child.wait(10)
            child.stdin.close()
            child.stdout.close()
            writer.close()
            drop_schema(servers.libpq_url, name)


@pytest.mark.parametrize("defence,bound", [("ping", invalidation.SILENT_AFTER + 1.0),
                                           ("age", toolkit.state.MEMORY_MAX_AGE + 0.5)])
def test_a_silent_subscription_is_not_served_stale_past_the_bound(
        clean: Servers, make_sm: Callable[..., toolkit.StateManager],
        monkeypatch: pytest.MonkeyPatch, defence: str, bound: float) -> None:
    if defence == "age":  # the PING check off: the age bound alone must hold
        monkeypatch.setattr(invalidation, "SILENT_AFTER", 3600.0)
    where = TcpProxy.to_url(clean.redis_url).target
    proxy = TcpProxy(*where).start()
    reader = toolkit.init_state_manager(clean.database_url, proxy.url_for(clean.redis_url),
                                        namespace=clean.namespace, schema=clean.schema)
    writer = make_sm()
    try:
        writer.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}])
        assert reader.get_job("a").status == "queued"
        proxy.stalled.set()  # nothing reaches the reader any more, and nothing is closed
        writer.cancel_job("a")
        wrote = time.monotonic()
        last_stale, answers = None, []
        while time.monotonic() - wrote < bound + 6.0:
            status = reader.get_job("a").status
            answers.append(status)
            if status == "queued":
                last_stale = time.monotonic() - wrote
            time.sleep(0.05)
        print(f"\n{defence}: last stale answer {last_stale:.2f}s after the write, "
              f"{answers.count('queued')} stale of {len(answers)} answers")
        assert answers[-1] == "cancelled" and last_stale is not None and last_stale <= bound
    finally:
        proxy.stalled.clear()
        proxy.cut()
        reader.close()
