-- 0005: idempotency keys. A create retried under its key (after a lost reply, say)
-- returns the entity the first call made instead of making a second one. One row per
-- key used, unique in this schema (the namespace's store): the entity it made (a
-- workflow; for a job, the job and its workflow) and the hash of the request, so the
-- same key with a different request is refused. A table beside the entities rather
-- than a column on them: the entities (and their copies in Redis and memory) stay as
-- they are, one constraint covers both kinds, and the row goes with its entity (ON
-- DELETE CASCADE: deleting or purging the entity frees its key). The foreign keys are
-- checked at COMMIT (DEFERRABLE INITIALLY DEFERRED), so a create claims its key with
-- its first statement, before the entity exists; a concurrent create under the same
-- key waits there for the first to commit, then finds the key taken.

CREATE TABLE idempotency_keys (
    key TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    job_id TEXT,
    request_hash TEXT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT pk_idempotency_keys PRIMARY KEY (key),
    CONSTRAINT fk_idempotency_keys_workflow_id_workflows FOREIGN KEY (workflow_id)
        REFERENCES workflows (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    CONSTRAINT fk_idempotency_keys_job_id_jobs FOREIGN KEY (job_id)
        REFERENCES jobs (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX ix_idempotency_keys_workflow_id ON idempotency_keys (workflow_id);
CREATE INDEX ix_idempotency_keys_job_id ON idempotency_keys (job_id);
