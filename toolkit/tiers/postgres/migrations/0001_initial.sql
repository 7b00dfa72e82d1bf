-- 0001: workflows, jobs, workers, job assignments, metric checkpoints.
-- Runs with search_path set to the target schema; names follow tables.NAMING_CONVENTION.

CREATE SEQUENCE job_enqueue_seq;

CREATE TABLE workflows (
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    version BIGINT NOT NULL,
    CONSTRAINT pk_workflows PRIMARY KEY (id)
);
CREATE INDEX ix_workflows_status ON workflows (status);

CREATE TABLE workers (
    id TEXT NOT NULL,
    hostname TEXT NOT NULL,
    status TEXT NOT NULL,
    queues TEXT[] NOT NULL,
    capacity INTEGER NOT NULL,
    metadata JSONB NOT NULL,
    last_heartbeat TIMESTAMP WITH TIME ZONE,
    registered_at TIMESTAMP WITH TIME ZONE NOT NULL,
    version BIGINT NOT NULL,
    CONSTRAINT pk_workers PRIMARY KEY (id)
);
CREATE INDEX ix_workers_status ON workers (status);

CREATE TABLE jobs (
    id TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    queue TEXT NOT NULL,
    payload JSONB,
    result JSONB,
    error TEXT,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    worker_id TEXT,
    depends_on TEXT[] NOT NULL,
    enqueue_seq BIGINT,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    started_at TIMESTAMP WITH TIME ZONE,
    finished_at TIMESTAMP WITH TIME ZONE,
    version BIGINT NOT NULL,
    CONSTRAINT pk_jobs PRIMARY KEY (id),
    CONSTRAINT uq_jobs_workflow_id_name UNIQUE (workflow_id, name),
    CONSTRAINT fk_jobs_workflow_id_workflows FOREIGN KEY (workflow_id)
        REFERENCES workflows (id) ON DELETE CASCADE,
    CONSTRAINT fk_jobs_worker_id_workers FOREIGN KEY (worker_id)
        REFERENCES workers (id) ON DELETE SET NULL
);
CREATE INDEX ix_jobs_status ON jobs (status);
CREATE INDEX ix_jobs_worker_id ON jobs (worker_id);
CREATE INDEX ix_jobs_queued ON jobs (queue, priority DESC, enqueue_seq) WHERE status = 'queued';
CREATE INDEX ix_jobs_live ON jobs (id) WHERE status NOT IN ('completed', 'cancelled');

CREATE TABLE job_assignments (
    id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    assigned_at TIMESTAMP WITH TIME ZONE NOT NULL,
    finished_at TIMESTAMP WITH TIME ZONE,
    CONSTRAINT pk_job_assignments PRIMARY KEY (id),
    CONSTRAINT fk_job_assignments_job_id_jobs FOREIGN KEY (job_id)
        REFERENCES jobs (id) ON DELETE CASCADE,
    CONSTRAINT fk_job_assignments_worker_id_workers FOREIGN KEY (worker_id)
        REFERENCES workers (id) ON DELETE CASCADE
);
CREATE INDEX ix_job_assignments_job_id ON job_assignments (job_id);
CREATE INDEX ix_job_assignments_worker_id ON job_assignments (worker_id);
CREATE UNIQUE INDEX ix_job_assignments_one_active ON job_assignments (job_id)
    WHERE status = 'active';

CREATE TABLE metric_checkpoints (
    name TEXT NOT NULL,
    value BIGINT NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT pk_metric_checkpoints PRIMARY KEY (name)
);

CREATE TABLE metric_buckets (
    name TEXT NOT NULL,
    bucket_start TIMESTAMP WITH TIME ZONE NOT NULL,
    value BIGINT NOT NULL,
    CONSTRAINT pk_metric_buckets PRIMARY KEY (name, bucket_start)
);
