-- 0008 — stock moved by what registers sell (docs/central.md "Stock"). Ingest adds, in
-- the transaction that first stores the documents, one row per center and item per
-- batch to stock_pending (receipts take out, refunds and voided receipts put back); the
-- reconciler's passes fold those rows into the centers' stock_levels and delete them.
-- The lines themselves stay in the documents.
-- Never edit this file once applied: add 0009_….sql.

CREATE TABLE stock_pending (
    id          bigserial   PRIMARY KEY,
    center_id   text        NOT NULL,
    item_id     text        NOT NULL,
    qty_milli   bigint      NOT NULL,     -- signed: a sale takes out, refund/void put back
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Each voided receipt, put back once however many voids name it.
CREATE TABLE stock_voided (
    register_id      text        NOT NULL,   -- the receipt
    seq              bigint      NOT NULL,
    void_register_id text        NOT NULL,   -- the void that put it back
    void_seq         bigint      NOT NULL,
    voided_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (register_id, seq),
    FOREIGN KEY (register_id, seq) REFERENCES documents (register_id, seq),
    FOREIGN KEY (void_register_id, void_seq) REFERENCES documents (register_id, seq)
);

-- A void stored before the receipt it cancels (batches commit out of order): the
-- reconciler's pass puts the receipt back once it is there, then forgets the void.
CREATE TABLE stock_voids_waiting (
    register_id   text        NOT NULL,
    seq           bigint      NOT NULL,
    voided_doc_id uuid        NOT NULL,
    since         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (register_id, seq),
    FOREIGN KEY (register_id, seq) REFERENCES documents (register_id, seq)
);
