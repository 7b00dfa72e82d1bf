-- 0009: scheduled jobs and retry backoff. A queued job with run_at in the future is
-- scheduled (a delayed job, or a retry backing off): Redis keeps it in its queue's
-- due-time set until it is due, and the rebuild restores that set from this column,
-- so a Redis loss loses no schedule. NULL: the job runs as soon as it is queued.
-- retry_policy is the job's own backoff (base, factor, cap, jitter), NULL for the
-- coordinator's default.

ALTER TABLE jobs ADD COLUMN run_at TIMESTAMP WITH TIME ZONE;
ALTER TABLE jobs ADD COLUMN retry_policy JSONB;
