"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import toolkit


@pytest.fixture
def ins(clean: Any) -> Iterator[toolkit.Inspector]:
    """A read-only Inspector on the test schema and namespace (heartbeat TTL 2 s), closed after."""
    inspector = toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                  schema=clean.schema, heartbeat_ttl=2.0)
    yield inspector
    inspector.close()


def stale_queue_entry(sm: toolkit.StateManager, raw_redis: Any, worker_id: str) -> str:
    """A job cancelled in PostgreSQL whose id is back at the head of its Redis queue (a stale
    entry the next claim pops first and PostgreSQL refuses); its id."""
    from toolkit.tiers.redis import keys

    gone = sm.dequeue(worker_id)
    assert gone is not None
    sm.cancel_job(gone.id)
    raw_redis.zadd(keys.queue(sm.ns, "default"), {gone.id: -1e12})
    return gone.id
