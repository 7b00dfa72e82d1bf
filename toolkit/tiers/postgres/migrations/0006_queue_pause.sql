-- 0006: queues an operator paused, with why, by whom and since when. A paused queue
-- hands out no job (the Redis claim script reads a mirror of this table, which the
-- rebuild and the repair restore from here), so a pause survives a coordinator
-- restart and a Redis loss. One row per paused queue; resuming deletes the row.

CREATE TABLE paused_queues (
    queue TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    paused_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT pk_paused_queues PRIMARY KEY (queue)
);
