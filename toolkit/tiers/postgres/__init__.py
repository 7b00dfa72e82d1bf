"""Tier 3: PostgreSQL, the source of truth."""
