-- 0008 — stock movements from the documents registers sell with (docs/central.md
-- "Stock"): one row per receipt or refund line, and per line of a voided receipt (its
-- reversal), written by ingest in the transaction that first stores the document; folded
-- into the centers' stock_levels by the reconciler's passes (applied_at set then).
-- Never edit this file once applied: add 0009_….sql.

CREATE TABLE stock_movements (
    register_id text        NOT NULL,
    seq         bigint      NOT NULL,        -- the receipt, refund or void
    line_no     integer     NOT NULL,        -- the line of the receipt (or the voided one)
    center_id   text        NOT NULL,
    item_id     text        NOT NULL,
    qty_milli   bigint      NOT NULL,        -- signed: a sale takes out, refund/void put back
    kind        text        NOT NULL CHECK (kind IN ('sale', 'refund', 'void')),
    -- a void's reversal: the receipt it puts back (each receipt is put back once)
    voids_register_id text,
    voids_seq         bigint,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    applied_at  timestamptz,
    PRIMARY KEY (register_id, seq, line_no),
    FOREIGN KEY (register_id, seq) REFERENCES documents (register_id, seq),
    CHECK ((kind = 'void') = (voids_seq IS NOT NULL AND voids_register_id IS NOT NULL))
);
CREATE UNIQUE INDEX stock_movements_voided_idx
    ON stock_movements (voids_register_id, voids_seq, line_no) WHERE kind = 'void';
CREATE INDEX stock_movements_pending_idx ON stock_movements (center_id)
    WHERE applied_at IS NULL;

-- A void stored before the receipt it cancels (batches commit out of order): the
-- reconciler's pass writes its reversal once the receipt is there, then forgets it.
CREATE TABLE stock_voids_waiting (
    register_id   text        NOT NULL,
    seq           bigint      NOT NULL,
    voided_doc_id uuid        NOT NULL,
    since         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (register_id, seq),
    FOREIGN KEY (register_id, seq) REFERENCES documents (register_id, seq)
);
