-- 0001 — the upward flow: who may send (centers, registers) and what they sent
-- (documents, typed views of receipts and shifts), what went wrong (conflicts,
-- dead letters), and where each register stands (register_state).
--
-- Money is bigint minor units of the row's currency; counts are bigint where the
-- protocol allows 2^31 or more (shift_no and z_number go up to 2^31 itself, one past
-- integer). Ids match the protocol's WireId pattern.
-- Never edit this file once applied: add 0002_….sql.

CREATE TABLE centers (
    center_id  text        PRIMARY KEY CHECK (center_id ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registers (
    register_id text        PRIMARY KEY CHECK (register_id ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    center_id   text        NOT NULL REFERENCES centers (center_id),
    name        text        NOT NULL DEFAULT '',
    -- RabbitMQ expands {username} unescaped into permission regexes: keep it plain.
    broker_user text        NOT NULL UNIQUE CHECK (broker_user ~ '^[a-z0-9-]{1,128}$'),
    labels      text[]      NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX registers_center_idx ON registers (center_id);

-- Every document exactly as it arrived. (register_id, seq) is the idempotency key:
-- ingest inserts with ON CONFLICT DO NOTHING and compares content_hash of what is there.
-- center_id is the center at the time of the document (a register may move later).
CREATE TABLE documents (
    register_id  text        NOT NULL REFERENCES registers (register_id),
    seq          bigint      NOT NULL CHECK (seq >= 1),
    doc_id       uuid        NOT NULL UNIQUE,
    center_id    text        NOT NULL REFERENCES centers (center_id),
    doc_type     text        NOT NULL,
    created_at   timestamptz NOT NULL,           -- the message's created_at (Unix ms)
    received_at  timestamptz NOT NULL DEFAULT now(),
    payload      bytea       NOT NULL,           -- the exact MessagePack bytes
    payload_json jsonb       NOT NULL,           -- the decoded message, for queries
    content_hash bytea       NOT NULL CHECK (octet_length(content_hash) = 32),  -- sha256(payload)
    PRIMARY KEY (register_id, seq)
);
CREATE INDEX documents_center_created_idx ON documents (center_id, created_at);
CREATE INDEX documents_type_created_idx ON documents (doc_type, created_at);

-- Receipts and refunds, one row per document, for history and shift reconciliation.
CREATE TABLE receipts (
    register_id text        NOT NULL,
    seq         bigint      NOT NULL,
    doc_id      uuid        NOT NULL UNIQUE,
    center_id   text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('receipt', 'refund')),
    receipt_no  text        NOT NULL,
    shift_no    bigint      NOT NULL CHECK (shift_no >= 1),
    currency    text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    total       bigint      NOT NULL,
    line_count  integer     NOT NULL CHECK (line_count >= 0),
    customer_id text,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (register_id, seq),
    FOREIGN KEY (register_id, seq) REFERENCES documents (register_id, seq)
);
CREATE INDEX receipts_shift_idx ON receipts (register_id, shift_no);
CREATE INDEX receipts_center_created_idx ON receipts (center_id, created_at);
CREATE INDEX receipts_customer_idx ON receipts (customer_id, created_at)
    WHERE customer_id IS NOT NULL;

-- One row per shift, filled from its shift_open and its shift_close (Z-report), which
-- may arrive in either order: upsert from both sides, each filling only its columns.
CREATE TABLE shifts (
    register_id    text        NOT NULL REFERENCES registers (register_id),
    shift_no       bigint      NOT NULL CHECK (shift_no >= 1),
    center_id      text        NOT NULL,
    currency       text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- from shift_open
    opened_seq     bigint,
    opened_at      timestamptz,
    opening_float  bigint,
    -- from shift_close
    closed_seq     bigint,
    closed_at      timestamptz,
    z_number       bigint,
    first_seq      bigint,     -- the seq range the register says the shift covers
    last_seq       bigint,
    receipt_count  bigint,
    refund_count   bigint,
    void_count     bigint,
    gross_sales    bigint,
    refunds_total  bigint,
    net_total      bigint,
    cash_expected  bigint,
    cash_counted   bigint,
    payments       jsonb,      -- [{method_id, count, amount}]
    taxes          jsonb,      -- [{tax_rate_id, rate_bp, base, tax}]
    PRIMARY KEY (register_id, shift_no),
    FOREIGN KEY (register_id, opened_seq) REFERENCES documents (register_id, seq),
    FOREIGN KEY (register_id, closed_seq) REFERENCES documents (register_id, seq),
    CHECK (opened_seq IS NOT NULL OR closed_seq IS NOT NULL),
    CHECK ((closed_seq IS NULL) = (closed_at IS NULL)),
    CHECK ((opened_seq IS NULL) = (opened_at IS NULL))
);
CREATE INDEX shifts_center_closed_idx ON shifts (center_id, closed_at);

-- The same idempotency key (or the same doc_id) arrived with different bytes: kept
-- here, never applied. Unique per incoming content, so a redelivery records nothing new.
CREATE TABLE conflicts (
    id               bigserial   PRIMARY KEY,
    kind             text        NOT NULL DEFAULT 'content'
                                 CHECK (kind IN ('content', 'doc_id')),
    register_id      text        NOT NULL,
    seq              bigint      NOT NULL,
    doc_id           uuid,                   -- the incoming document's
    existing_hash    bytea       NOT NULL,
    incoming_hash    bytea       NOT NULL,
    incoming_payload bytea       NOT NULL,
    detected_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz,
    resolution       text,
    UNIQUE (register_id, seq, incoming_hash),
    CHECK ((resolved_at IS NULL) = (resolution IS NULL))
);
CREATE INDEX conflicts_unresolved_idx ON conflicts (detected_at) WHERE resolved_at IS NULL;

-- Input that could not be applied, with its raw bytes, for an operator to replay or
-- discard. source: 'ingest' (refused by the worker), 'dlx' (dead-lettered by the
-- broker after the delivery limit), and later flows ('rpc', 'presence'…).
-- register_id and seq are what the message claimed, when it could be read that far.
CREATE TABLE dead_letters (
    id            bigserial   PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    source        text        NOT NULL CHECK (source ~ '^[a-z][a-z_]{0,31}$'),
    routing_key   text,
    user_id       text,
    message_id    text,
    register_id   text,
    seq           bigint,
    code          text        NOT NULL,
    field         text        NOT NULL DEFAULT '',
    reason        text        NOT NULL,
    payload       bytea       NOT NULL,
    payload_hash  bytea       GENERATED ALWAYS AS (sha256(payload)) STORED,
    headers       jsonb       NOT NULL DEFAULT '{}',
    status        text        NOT NULL DEFAULT 'new'
                              CHECK (status IN ('new', 'replayed', 'discarded')),
    status_reason text,
    status_at     timestamptz
);
CREATE INDEX dead_letters_code_idx ON dead_letters (code);
CREATE INDEX dead_letters_status_idx ON dead_letters (status, received_at);
CREATE INDEX dead_letters_register_idx ON dead_letters (register_id, seq)
    WHERE register_id IS NOT NULL;
CREATE INDEX dead_letters_payload_hash_idx ON dead_letters (payload_hash);

-- Where each register stands, updated in the same transaction as its documents.
-- contiguous_seq: every seq 1..contiguous_seq is stored (the cumulative ack point);
-- last_seq: the highest seq stored. A hole exists exactly when last_seq > contiguous_seq.
CREATE TABLE register_state (
    register_id      text        PRIMARY KEY REFERENCES registers (register_id),
    contiguous_seq   bigint      NOT NULL DEFAULT 0 CHECK (contiguous_seq >= 0),
    last_seq         bigint      NOT NULL DEFAULT 0,
    last_received_at timestamptz,
    CHECK (last_seq >= contiguous_seq)
);
CREATE INDEX register_state_holes_idx ON register_state (register_id)
    WHERE last_seq > contiguous_seq;
