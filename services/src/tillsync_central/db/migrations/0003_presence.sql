-- 0003 — presence: the latest heartbeat of every register (docs/central.md#presence).
-- One row per register, overwritten by each heartbeat the presence worker accepts.
-- last_seen is central's clock when the heartbeat was stored (a till's clock may be
-- wrong); sent_at is the register's own created_at, kept for comparison.
-- Never edit this file once applied: add 0004_….sql.

CREATE TABLE register_presence (
    register_id   text        PRIMARY KEY REFERENCES registers (register_id),
    last_seen     timestamptz NOT NULL,
    sent_at       timestamptz NOT NULL,
    agent_version text        NOT NULL,
    pending       bigint      NOT NULL CHECK (pending >= 0),
    rejected      bigint      NOT NULL CHECK (rejected >= 0),
    acknowledged  bigint      NOT NULL CHECK (acknowledged >= 0),
    last_seq      bigint      NOT NULL CHECK (last_seq >= 0),
    cursors       jsonb       NOT NULL DEFAULT '{}',  -- {scope: scope_seq}
    last_sync     jsonb,                              -- SyncSummary, or NULL
    last_error    text,
    heartbeat     jsonb       NOT NULL                -- the whole decoded message
);
-- "Which registers have gone quiet": the fleet view sorts and filters on it.
CREATE INDEX register_presence_last_seen_idx ON register_presence (last_seen);
