"""Tiers: the three tiers of one namespace, travelling together as one value.

The recovery functions, the comparison and the write pipeline all work on the
same four things: PostgreSQL (``db``), Redis (``redis``), the namespace
(``ns``) and this process's memory tier. They take one :class:`Tiers` instead.
"""

from __future__ import annotations

import dataclasses

from toolkit.tiers.memory import Memory
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis.client import Client


@dataclasses.dataclass(frozen=True)
class Tiers:
    """PostgreSQL, Redis, the namespace of the keys, and a memory tier."""

    db: Database
    redis: Client
    ns: str
    memory: Memory
