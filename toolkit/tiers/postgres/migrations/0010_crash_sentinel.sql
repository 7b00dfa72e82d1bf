-- 0010: one token per namespace in an UNLOGGED table, written by each rebuild. PostgreSQL
-- empties an unlogged table whenever it recovers from a crash (a server crash, a backend
-- crash that resets the server, an immediate shutdown) and a promoted standby has it
-- empty, while a clean restart keeps it: a token that Redis holds but this table lost says
-- the server crashed since the last rebuild. With synchronous_commit = off (opt-in), such a
-- crash may have lost commits that Redis holds, and the next rebuild lets PostgreSQL win.

CREATE UNLOGGED TABLE crash_sentinel (
    namespace TEXT NOT NULL,
    token TEXT NOT NULL,
    CONSTRAINT pk_crash_sentinel PRIMARY KEY (namespace)
);
