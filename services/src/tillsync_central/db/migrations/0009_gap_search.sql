-- 0009 — how far the reconciler has searched each register's seqs for holes
-- (docs/central.md "Reconciliation"). Every seq after contiguous_seq and up to
-- gaps_checked_seq is either stored or inside an open hole in seq_holes, so a pass reads
-- only the open holes and the documents stored after gaps_checked_seq, not every document
-- after a hole that stays open. 0 (every existing row): the first pass searches all of it
-- once, as passes did before.
-- Never edit this file once applied: add 0010_….sql.

ALTER TABLE register_state
    ADD COLUMN gaps_checked_seq bigint NOT NULL DEFAULT 0 CHECK (gaps_checked_seq >= 0);
