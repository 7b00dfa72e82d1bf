-- 0007: find jobs by their payload (Inspector.jobs(payload=...), `toolkit jobs --payload`).
-- A GIN index with jsonb_path_ops serves `payload @> '{"customer": {"plan": "pro"}}'`
-- (containment only, smaller and faster than the default jsonb_ops).
-- CREATE INDEX blocks writes to jobs while it builds. On a large jobs table, build it
-- first by hand without blocking, with the same name, and this migration keeps it:
--   CREATE INDEX CONCURRENTLY ix_jobs_payload ON <schema>.jobs USING gin (payload jsonb_path_ops);

CREATE INDEX IF NOT EXISTS ix_jobs_payload ON jobs USING gin (payload jsonb_path_ops);
