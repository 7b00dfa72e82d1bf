-- 0008: operator actions. One row per bulk action applied by an operator (requeue,
-- cancel, fail, delete, set_priority, move_queue over a filter): who (actor), why
-- (reason), what (verb, value, the filter as JSON), and what came of it: how many jobs
-- the plan named (planned), how many this action changed (applied, written in the same
-- transaction as each batch of changes, so it is true after a crash) and how many had
-- changed since the plan and were left alone (skipped, as of the latest run). The id is
-- the plan's: applying the same plan again finishes the same action. Each changed job's
-- event names this id in its detail (``action_id``).

CREATE TABLE operator_actions (
    id TEXT NOT NULL,
    verb TEXT NOT NULL,
    actor TEXT,
    reason TEXT,
    value JSONB,
    filter JSONB NOT NULL,
    status TEXT NOT NULL,
    planned INTEGER NOT NULL,
    applied INTEGER NOT NULL,
    skipped INTEGER NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    finished_at TIMESTAMP WITH TIME ZONE,
    CONSTRAINT pk_operator_actions PRIMARY KEY (id)
);
CREATE INDEX ix_operator_actions_created_at ON operator_actions (created_at);
