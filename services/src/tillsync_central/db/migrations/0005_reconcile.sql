-- 0005 — reconciliation (invariant 6, docs/central.md "Reconciliation"): holes in a
-- register's seqs and the resend requests sent for them, and every closed shift's
-- Z-report checked against the documents central received.
-- Never edit this file once applied: add 0006_….sql.

-- A hole: seqs from_seq..to_seq of a register are missing while a later seq is stored.
-- Open while resolved_at is NULL; a hole filled from its start ends and, if seqs are
-- still missing after what arrived, a new one (another from_seq) begins.
CREATE TABLE seq_holes (
    id                bigserial   PRIMARY KEY,
    register_id       text        NOT NULL REFERENCES registers (register_id),
    from_seq          bigint      NOT NULL CHECK (from_seq >= 1),
    to_seq            bigint      NOT NULL,
    detected_at       timestamptz NOT NULL DEFAULT now(),
    requests          integer     NOT NULL DEFAULT 0 CHECK (requests >= 0),
    last_requested_at timestamptz,
    resolved_at       timestamptz,
    CHECK (to_seq >= from_seq)
);
CREATE UNIQUE INDEX seq_holes_open_idx ON seq_holes (register_id, from_seq)
    WHERE resolved_at IS NULL;

-- One row per closed shift: 'waiting' until every seq of its range is stored, then
-- 'ok' or 'mismatch' (final) with the fields that differ.
CREATE TABLE shift_reconciliations (
    register_id text        NOT NULL,
    shift_no    bigint      NOT NULL,
    status      text        NOT NULL CHECK (status IN ('waiting', 'ok', 'mismatch')),
    checked_at  timestamptz NOT NULL DEFAULT now(),
    differences jsonb       NOT NULL DEFAULT '[]',  -- [{field, reported, found}]
    PRIMARY KEY (register_id, shift_no),
    FOREIGN KEY (register_id, shift_no) REFERENCES shifts (register_id, shift_no)
);
CREATE INDEX shift_reconciliations_open_idx ON shift_reconciliations (register_id)
    WHERE status = 'waiting';
