-- 0007 — loyalty points earned and redeemed at registers, posted to central's balances
-- (docs/central.md "Loyalty"). One row per loyalty document, written in the ingest
-- transaction that first stores the document: the ledger of every balance change a
-- register caused, and what a redemption could not cover.
-- Never edit this file once applied: add 0008_….sql.

CREATE TABLE loyalty_postings (
    register_id   text        NOT NULL,
    seq           bigint      NOT NULL,
    doc_id        uuid        NOT NULL,
    customer_id   text        NOT NULL,
    scope         text        NOT NULL,
    delta         bigint      NOT NULL CHECK (delta <> 0),    -- + accrual, - redemption
    balance_after bigint      NOT NULL CHECK (balance_after >= 0),
    shortfall     bigint      NOT NULL DEFAULT 0 CHECK (shortfall >= 0),
    posted_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (register_id, seq),
    FOREIGN KEY (register_id, seq) REFERENCES documents (register_id, seq)
);
CREATE INDEX loyalty_postings_customer_idx ON loyalty_postings (customer_id, posted_at);
CREATE INDEX loyalty_postings_shortfall_idx ON loyalty_postings (posted_at)
    WHERE shortfall > 0;
