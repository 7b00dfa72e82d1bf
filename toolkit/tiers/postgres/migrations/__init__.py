"""Numbered SQL migrations, applied in order by ``toolkit.tiers.postgres.migrate``."""
