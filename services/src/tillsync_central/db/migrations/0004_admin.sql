-- 0004 — the admin API and dashboard (docs/admin.md): operators with roles, their
-- sessions, the audit log of every write, the sync history kept from heartbeats, and the
-- indexes the dashboard's pages read by.
-- Never edit this file once applied: add 0005_….sql.

-- password_hash is scrypt(password, salt, n=2^14, r=8, p=1), 32 bytes; salt is random
-- per operator. A disabled operator keeps its audit trail but cannot log in.
CREATE TABLE operators (
    username      text        PRIMARY KEY CHECK (username ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    role          text        NOT NULL CHECK (role IN ('administrator', 'supervisor', 'viewer')),
    password_salt bytea       NOT NULL CHECK (octet_length(password_salt) = 16),
    password_hash bytea       NOT NULL CHECK (octet_length(password_hash) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz
);

-- token_hash is sha256 of the random token the operator holds (cookie or bearer): a
-- leaked table lets nobody in.
CREATE TABLE operator_sessions (
    token_hash bytea       PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    username   text        NOT NULL REFERENCES operators (username) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    kind       text        NOT NULL DEFAULT 'cookie' CHECK (kind IN ('cookie', 'token'))
);
CREATE INDEX operator_sessions_expires_idx ON operator_sessions (expires_at);

-- Every write through the admin API: who, what (the route's action), when, on what.
CREATE TABLE audit_log (
    id       bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    username text        NOT NULL,
    action   text        NOT NULL,
    target   text        NOT NULL DEFAULT '',
    details  jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_username_idx ON audit_log (username, at);

-- Heartbeats carry only their register's last sync; central keeps each one it sees here,
-- so the dashboard shows a history per register. Filled by a trigger on
-- register_presence, so the presence worker's single upsert stays what it is.
CREATE TABLE register_syncs (
    register_id text        NOT NULL REFERENCES registers (register_id),
    kind        text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    result      text        NOT NULL,
    sent        bigint      NOT NULL DEFAULT 0,
    received    bigint      NOT NULL DEFAULT 0,
    errors      bigint      NOT NULL DEFAULT 0,
    last_error  text,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (register_id, kind, started_at)
);
CREATE INDEX register_syncs_register_idx ON register_syncs (register_id, started_at DESC);

CREATE FUNCTION register_sync_of_heartbeat() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_sync IS NOT NULL
       AND (TG_OP = 'INSERT' OR NEW.last_sync IS DISTINCT FROM OLD.last_sync) THEN
        INSERT INTO register_syncs (register_id, kind, started_at, finished_at, result, sent,
                                    received, errors, last_error)
        VALUES (NEW.register_id, NEW.last_sync->>'kind',
                to_timestamp((NEW.last_sync->>'started_at')::bigint / 1000.0),
                to_timestamp((NEW.last_sync->>'finished_at')::bigint / 1000.0),
                NEW.last_sync->>'result',
                coalesce((NEW.last_sync->>'sent')::bigint, 0),
                coalesce((NEW.last_sync->>'received')::bigint, 0),
                coalesce((NEW.last_sync->>'errors')::bigint, 0),
                CASE WHEN NEW.last_sync->>'result' <> 'successful' THEN NEW.last_error END)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER register_presence_sync_history
    AFTER INSERT OR UPDATE OF last_sync ON register_presence
    FOR EACH ROW EXECUTE FUNCTION register_sync_of_heartbeat();

-- The live feed reads "documents received since"; the documents page lists documents
-- newest first (keyset on created_at, register_id, seq), of everyone or of a register;
-- receipt totals read a range of days.
CREATE INDEX documents_received_idx ON documents (received_at);
CREATE INDEX documents_created_key_idx ON documents (created_at, register_id, seq);
CREATE INDEX documents_register_created_idx ON documents (register_id, created_at);
CREATE INDEX receipts_created_idx ON receipts (created_at);
CREATE INDEX receipts_register_created_idx ON receipts (register_id, created_at);
CREATE INDEX dead_letters_received_idx ON dead_letters (received_at);
