-- 0002: an append-only log of job state changes, written in the same transaction
-- as each change. No foreign key to jobs: the log outlives a deleted job.

CREATE TABLE job_events (
    id BIGSERIAL NOT NULL,
    job_id TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    event TEXT NOT NULL,
    status TEXT NOT NULL,
    worker_id TEXT,
    attempt INTEGER,
    at TIMESTAMP WITH TIME ZONE NOT NULL,
    detail JSONB,
    CONSTRAINT pk_job_events PRIMARY KEY (id)
);
CREATE INDEX ix_job_events_job_id ON job_events (job_id);
CREATE INDEX ix_job_events_workflow_id ON job_events (workflow_id);
CREATE INDEX ix_job_events_at ON job_events (at);

-- Fencing tokens handed out per lock name: a floor that survives a Redis restart.
CREATE TABLE lock_fences (
    name TEXT NOT NULL,
    token BIGINT NOT NULL,
    CONSTRAINT pk_lock_fences PRIMARY KEY (name)
);
