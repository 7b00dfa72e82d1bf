"""Whether this Redis may drop our keys: its eviction policy, memory limit and use. Reads only.

A Redis set up as a cache (any ``maxmemory-policy`` but ``noeviction``) evicts
keys when used memory reaches ``maxmemory``: cached entities (harmless, a miss),
but also queue entries, in-flight leases, locks and counters, without a word.
The policy counts even with no limit set today: managed services set one for
you, and the policy applies the moment one appears (Sidekiq and BullMQ warn
the same way). Where ``CONFIG`` is not allowed (ACL, managed Redis), the risk
is unknown: said once, and the toolkit goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from toolkit.tiers.redis.client import Client

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"
NEAR_LIMIT = 0.9
"""Share of ``maxmemory`` in use from which the finding is louder."""


@dataclass(frozen=True)
class EvictionRisk:
    """What Redis said about evicting keys, and the finding (None when safe).

    ``level`` is the :mod:`logging` level the finding is logged at: WARNING for
    a policy that may evict or an unreadable CONFIG, ERROR when used memory is
    within 10% of the limit.
    """

    policy: str | None
    maxmemory: int | None
    used_memory: int | None
    finding: str | None
    level: int = logging.INFO

    @property
    def safe(self) -> bool:
        """True when Redis is known never to evict (``noeviction``) and not near its limit."""
        return self.finding is None


def read(client: Client) -> EvictionRisk:
    """Read ``CONFIG GET maxmemory*`` and ``INFO memory``; judge the risk.

    Raises
    ------
    StorageUnavailable
        Redis cannot be reached (a refused CONFIG is not an error: see ``finding``).
    """
    with client.translate("read the eviction policy"):
        try:
            conf = client.redis.config_get("maxmemory*")
        except redis.ResponseError as exc:  # NOPERM under an ACL, or CONFIG renamed away
            return EvictionRisk(None, None, None, (
                f"Redis at {client.where} does not let us read its eviction policy "
                f"(CONFIG GET: {exc}); make sure maxmemory-policy is noeviction, or queue "
                "entries, leases and locks may be evicted"), logging.WARNING)
        try:
            used: int | None = int(client.redis.info("memory")["used_memory"])
        except (redis.ResponseError, KeyError, ValueError):
            used = None
    return judge(client.where, conf.get("maxmemory-policy"), _int(conf.get("maxmemory")), used)


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def judge(where: str, policy: str | None, maxmemory: int | None,
          used: int | None) -> EvictionRisk:
    """The finding for a policy, a limit (0: none) and used memory (bytes)."""
    near = bool(maxmemory and used is not None and used >= NEAR_LIMIT * maxmemory)
    share = f"{used / maxmemory:.0%} of maxmemory {maxmemory} bytes" if near and maxmemory and \
        used is not None else ""
    if policy == SAFE_POLICY:
        if not near:
            return EvictionRisk(policy, maxmemory, used, None)
        return EvictionRisk(policy, maxmemory, used, (
            f"Redis at {where} uses {share}: with noeviction it will refuse writes (OOM) soon"),
            logging.ERROR)
    if near:
        text = (f"Redis at {where} has maxmemory-policy {policy} and uses {share}: it is "
                "evicting, or about to evict, keys the toolkit needs (queue entries, leases, "
                "locks, counters); set maxmemory-policy noeviction")
        return EvictionRisk(policy, maxmemory, used, text, logging.ERROR)
    limit = (f"evicts keys once used memory reaches maxmemory {maxmemory} bytes" if maxmemory
             else "will evict keys as soon as a maxmemory limit is set")
    text = (f"Redis at {where} has maxmemory-policy {policy}: it {limit}, queue entries, "
            "leases, locks and counters included; set maxmemory-policy noeviction")
    return EvictionRisk(policy, maxmemory, used, text, logging.WARNING)


def announce(risk: EvictionRisk) -> None:
    """Log the finding (once per connect: the callers call this once)."""
    if risk.finding is not None:
        log.log(risk.level, "%s", risk.finding, extra={"action": "eviction_policy"})
