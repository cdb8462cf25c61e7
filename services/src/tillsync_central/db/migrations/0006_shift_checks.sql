-- 0006 — the reconciler finds the closed shifts still to check through a partial index
-- instead of anti-joining every closed shift ever against shift_reconciliations (which
-- grows by registers × days). A shift is checked once its verdict is final ('ok' or
-- 'mismatch'); 'waiting' shifts stay unchecked. See docs/central.md "Reconciliation".
-- Never edit this file once applied: add 0007_….sql.

ALTER TABLE shifts ADD COLUMN z_checked boolean NOT NULL DEFAULT false;

UPDATE shifts s SET z_checked = true
FROM shift_reconciliations r
WHERE r.register_id = s.register_id AND r.shift_no = s.shift_no AND r.status <> 'waiting';

CREATE INDEX shifts_unchecked_idx ON shifts (closed_at)
    WHERE closed_seq IS NOT NULL AND NOT z_checked;
