-- 0004: the settings a coordinator runs with that change the meaning of state:
-- the heartbeat TTL decides which workers are alive, the claim lease when a popped
-- job returns to its queue. Every StateManager records them per Redis namespace
-- when it starts, so an Inspector or a CLI command in another process judges the
-- state exactly as the coordinator does (read-only: it never writes this table).

CREATE TABLE settings (
    namespace TEXT NOT NULL,
    heartbeat_ttl DOUBLE PRECISION NOT NULL,
    claim_lease DOUBLE PRECISION NOT NULL,
    written_by TEXT NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT pk_settings PRIMARY KEY (namespace)
);
