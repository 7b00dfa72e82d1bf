"""The tables of the PostgreSQL tier, as SQLAlchemy Core metadata.

The tables have no schema here: the schema comes per connection through
``schema_translate_map``. The DDL that creates them lives in ``migrations/``;
a test checks that ``metadata.create_all`` and the migrations build the same
schema, so this module and the migrations cannot drift apart.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Sequence,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)
TZ = TIMESTAMP(timezone=True)

LIVE_JOB_CLAUSE = text("status NOT IN ('completed', 'cancelled')")

enqueue_seq = Sequence("job_enqueue_seq", metadata=metadata)

schema_migrations = Table(
    "schema_migrations", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("applied_at", TZ, nullable=False),
)

workflows = Table(
    "workflows", metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("metadata", JSONB, nullable=False),
    Column("created_at", TZ, nullable=False),
    Column("updated_at", TZ, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index(None, "status"),
)

workers = Table(
    "workers", metadata,
    Column("id", Text, primary_key=True),
    Column("hostname", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("queues", ARRAY(Text), nullable=False),
    Column("capacity", Integer, nullable=False),
    Column("metadata", JSONB, nullable=False),
    Column("last_heartbeat", TZ),
    Column("registered_at", TZ, nullable=False),
    Column("version", BigInteger, nullable=False),
    Index(None, "status"),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Text, primary_key=True),
    Column("workflow_id", Text, ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
    Column("name", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("queue", Text, nullable=False),
    Column("payload", JSONB(none_as_null=True)),
    Column("result", JSONB(none_as_null=True)),
    Column("error", Text),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("worker_id", Text, ForeignKey("workers.id", ondelete="SET NULL")),
    Column("depends_on", ARRAY(Text), nullable=False),
    Column("enqueue_seq", BigInteger),
    Column("created_at", TZ, nullable=False),
    Column("updated_at", TZ, nullable=False),
    Column("started_at", TZ),
    Column("finished_at", TZ),
    Column("version", BigInteger, nullable=False),
    Column("run_at", TZ),  # 0009: when a queued job may run (NULL: at once)
    Column("retry_policy", JSONB(none_as_null=True)),  # 0009: the job's own backoff
    UniqueConstraint("workflow_id", "name"),
    Index("ix_jobs_status_workflow_id", "status", "workflow_id"),  # roll-up probes (0003)
    Index(None, "worker_id"),
    Index("ix_jobs_queued", "queue", text("priority DESC"), "enqueue_seq",
          postgresql_where=text("status = 'queued'")),
    Index("ix_jobs_live", "id", postgresql_where=LIVE_JOB_CLAUSE),
    Index("ix_jobs_payload", "payload", postgresql_using="gin",  # payload search (0007)
          postgresql_ops={"payload": "jsonb_path_ops"}),
    Index("ix_jobs_dependents", "depends_on", postgresql_using="gin",  # releases (0011)
          postgresql_with={"fastupdate": "off"}, postgresql_where=text("status = 'pending'")),
)

job_assignments = Table(
    "job_assignments", metadata,
    Column("id", Text, primary_key=True),
    Column("job_id", Text, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("worker_id", Text, ForeignKey("workers.id", ondelete="CASCADE"), nullable=False),
    Column("status", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("assigned_at", TZ, nullable=False),
    Column("finished_at", TZ),
    Index(None, "job_id"),
    Index(None, "worker_id"),
    Index("ix_job_assignments_one_active", "job_id", unique=True,
          postgresql_where=text("status = 'active'")),
)

metric_checkpoints = Table(
    "metric_checkpoints", metadata,
    Column("name", Text, primary_key=True),
    Column("value", BigInteger, nullable=False),
    Column("updated_at", TZ, nullable=False),
)

metric_buckets = Table(
    "metric_buckets", metadata,
    Column("name", Text, primary_key=True),
    Column("bucket_start", TZ, primary_key=True),
    Column("value", BigInteger, nullable=False),
)

job_events = Table(
    "job_events", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False),
    Column("workflow_id", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("worker_id", Text),
    Column("attempt", Integer),
    Column("at", TZ, nullable=False),
    Column("detail", JSONB(none_as_null=True)),
    Index(None, "job_id"),
    Index(None, "workflow_id"),
    Index(None, "at"),
)

lock_fences = Table(
    "lock_fences", metadata,
    Column("name", Text, primary_key=True),
    Column("token", BigInteger, nullable=False),
)

settings = Table(
    "settings", metadata,
    Column("namespace", Text, primary_key=True),
    Column("heartbeat_ttl", Double, nullable=False),
    Column("claim_lease", Double, nullable=False),
    Column("written_by", Text, nullable=False),
    Column("updated_at", TZ, nullable=False),
)
"""The coordinator settings that change the meaning of state, per namespace (0004)."""

idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("key", Text, primary_key=True),
    Column("workflow_id", Text, ForeignKey("workflows.id", ondelete="CASCADE", deferrable=True,
                                           initially="DEFERRED"), nullable=False),
    Column("job_id", Text, ForeignKey("jobs.id", ondelete="CASCADE", deferrable=True,
                                      initially="DEFERRED")),
    Column("request_hash", Text, nullable=False),
    Column("created_at", TZ, nullable=False),
    Index(None, "workflow_id"),
    Index(None, "job_id"),
)
"""The idempotency key of each create made under one, and its request's hash (0005)."""

paused_queues = Table(
    "paused_queues", metadata,
    Column("queue", Text, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("paused_at", TZ, nullable=False),
)
"""Queues an operator paused: no job is handed out of them until resumed (0006)."""

crash_sentinel = Table(
    "crash_sentinel", metadata,
    Column("namespace", Text, primary_key=True),
    Column("token", Text, nullable=False),
    prefixes=["UNLOGGED"],
)
"""Each namespace's token of its last rebuild; UNLOGGED, so a crash recovery empties it (0010)."""

operator_actions = Table(
    "operator_actions", metadata,
    Column("id", Text, primary_key=True),
    Column("verb", Text, nullable=False),
    Column("actor", Text),
    Column("reason", Text),
    Column("value", JSONB(none_as_null=True)),
    Column("filter", JSONB, nullable=False),
    Column("status", Text, nullable=False),
    Column("planned", Integer, nullable=False),
    Column("applied", Integer, nullable=False),
    Column("skipped", Integer, nullable=False),
    Column("created_at", TZ, nullable=False),
    Column("updated_at", TZ, nullable=False),
    Column("finished_at", TZ),
    Index(None, "created_at"),
)
"""One row per bulk operator action: who, why, the filter, planned/applied/skipped (0008)."""

ENTITY_TABLES = {
    "workflow": workflows,
    "job": jobs,
    "worker": workers,
    "assignment": job_assignments,
}
