"""Storage tiers: memory, Redis, PostgreSQL. Internal: not part of the public API."""
