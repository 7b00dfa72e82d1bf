-- 0003: after every job move the workflow roll-up asks "has this workflow a job
-- in status X?". An index on (status, workflow_id) answers each question with one
-- index probe instead of reading every job of the workflow. It replaces the
-- status-only index: same leading column, so queries by status alone still use it.

DROP INDEX ix_jobs_status;
CREATE INDEX ix_jobs_status_workflow_id ON jobs (status, workflow_id);
