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
