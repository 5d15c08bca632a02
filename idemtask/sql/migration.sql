-- The effect table of idemtask.sql: one row per idempotency key, written in the same
-- transaction as the task's own writes. Postgres and SQLite.
CREATE TABLE IF NOT EXISTS idemtask_effects (
    key TEXT PRIMARY KEY,
    token BIGINT NOT NULL,
    task_name TEXT NOT NULL,
    value BYTEA,
    created_at TIMESTAMP NOT NULL
);
