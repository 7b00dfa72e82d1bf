"""Tier 2: Redis (cache, queues, heartbeats, locks, metrics)."""
