"""The typed tables filled from newly stored documents: receipts and shifts.

The receipts' rows are inserted with the documents, in one statement
(:func:`receipt_columns`); the shifts' by :func:`insert_shifts` after them.

``receipts`` has one row per receipt or refund. ``shifts`` has one row per register and
shift number, opened by its ``shift_open`` and completed by its ``shift_close``
(Z-report totals); they may arrive in either order, so each upserts only its own columns,
and only the first of each kind counts (a second ``shift_open`` of the same shift is kept
as a document and changes nothing here).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from tillsync_protocol import Document, Receipt, Refund, ShiftClose, ShiftOpen

from .dead_letters import Conn

__all__ = ["insert_shifts", "receipt_columns", "timestamp"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_RECEIPT_WIDTH = 12
# Every shift row a batch will write, locked first and in one order for every worker
# (that of the lock keys themselves): opens and closes are two statements, and two
# workers with one shift's open and another's close each, crosswise, would otherwise
# each hold a row the other's second statement waits for (a deadlock PostgreSQL breaks
# by failing one batch). The keys are in a namespace of their own (the first argument).
_LOCK_SHIFTS = """
SELECT count(pg_advisory_xact_lock(29544, k.key))
FROM (SELECT DISTINCT hashtext(u.register_id || '/' || u.shift_no) AS key
      FROM unnest($1::text[], $2::bigint[]) AS u(register_id, shift_no)
      ORDER BY 1) AS k
"""
_OPEN_SHIFTS = """
INSERT INTO shifts AS s (register_id, shift_no, center_id, currency, opened_seq, opened_at,
                         opening_float)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[],
                     $6::timestamptz[], $7::bigint[])
ON CONFLICT (register_id, shift_no) DO UPDATE
SET opened_seq = EXCLUDED.opened_seq, opened_at = EXCLUDED.opened_at,
    opening_float = EXCLUDED.opening_float
WHERE s.opened_seq IS NULL
"""
_CLOSE_SHIFTS = """
INSERT INTO shifts AS s (register_id, shift_no, center_id, currency, closed_seq, closed_at,
                         z_number, first_seq, last_seq, receipt_count, refund_count,
                         void_count, gross_sales, refunds_total, net_total, cash_expected,
                         cash_counted, payments, taxes)
SELECT u.register_id, u.shift_no, u.center_id, u.currency, u.closed_seq, u.closed_at,
       u.z_number, u.first_seq, u.last_seq, u.receipt_count, u.refund_count, u.void_count,
       u.gross_sales, u.refunds_total, u.net_total, u.cash_expected, u.cash_counted,
       u.payments::jsonb, u.taxes::jsonb
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[],
            $6::timestamptz[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
            $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[],
            $16::bigint[], $17::bigint[], $18::text[], $19::text[])
     AS u(register_id, shift_no, center_id, currency, closed_seq, closed_at, z_number,
          first_seq, last_seq, receipt_count, refund_count, void_count, gross_sales,
          refunds_total, net_total, cash_expected, cash_counted, payments, taxes)
ON CONFLICT (register_id, shift_no) DO UPDATE
SET closed_seq = EXCLUDED.closed_seq, closed_at = EXCLUDED.closed_at,
    z_number = EXCLUDED.z_number, first_seq = EXCLUDED.first_seq,
    last_seq = EXCLUDED.last_seq, receipt_count = EXCLUDED.receipt_count,
    refund_count = EXCLUDED.refund_count, void_count = EXCLUDED.void_count,
    gross_sales = EXCLUDED.gross_sales, refunds_total = EXCLUDED.refunds_total,
    net_total = EXCLUDED.net_total, cash_expected = EXCLUDED.cash_expected,
    cash_counted = EXCLUDED.cash_counted, payments = EXCLUDED.payments,
    taxes = EXCLUDED.taxes
WHERE s.closed_seq IS NULL
"""


def timestamp(unix_ms: int) -> datetime:
    """A protocol timestamp (Unix milliseconds) as an exact UTC datetime."""
    return _EPOCH + timedelta(milliseconds=unix_ms)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)]


def _first_per_shift(documents: Sequence[Document]) -> list[Document]:
    # One statement may not upsert the same row twice: keep the lowest seq of each shift.
    chosen: dict[tuple[str, int], Document] = {}
    for doc in sorted(documents, key=lambda d: d.seq):
        chosen.setdefault((doc.register_id, doc.body.shift_no), doc)  # type: ignore[attr-defined]
    return sorted(chosen.values(), key=lambda d: (d.register_id, d.seq))


def receipt_columns(documents: Sequence[Document]) -> list[list[Any]]:
    """The ``receipts`` rows of the receipts and refunds among ``documents``, one list per
    column (``register_id, seq, doc_id, center_id, kind, receipt_no, shift_no, currency,
    total, line_count, customer_id, created_at``) for an ``unnest`` insert.
    :mod:`tillsync_central.store` inserts them in the documents' own statement, joined to
    the documents that statement stored, so a duplicate gets no second row."""
    rows = [
        (
            d.register_id,
            d.seq,
            d.doc_id,
            d.center_id,
            d.type,
            d.body.receipt_no,
            d.body.shift_no,
            d.body.currency,
            d.body.total,
            len(d.body.lines),
            d.body.customer_id,
            timestamp(d.created_at),
        )
        for d in documents
        if isinstance(d, (Receipt, Refund))
    ]
    return _columns(rows, _RECEIPT_WIDTH)


async def insert_shifts(conn: Conn, documents: Sequence[Document]) -> None:
    """Fill ``shifts`` for the shift opens and closes among documents just inserted into
    ``documents``."""
    opens = _first_per_shift([d for d in documents if isinstance(d, ShiftOpen)])
    closes = _first_per_shift([d for d in documents if isinstance(d, ShiftClose)])
    keys = {(d.register_id, d.body.shift_no) for d in [*opens, *closes]}  # type: ignore[attr-defined]
    if len(keys) > 1:  # a transaction writing one shift row cannot be in a lock cycle
        await conn.execute(_LOCK_SHIFTS, [k[0] for k in keys], [k[1] for k in keys])
    if opens:
        open_rows = [
            (
                d.register_id,
                d.body.shift_no,
                d.center_id,
                d.body.currency,
                d.seq,
                timestamp(d.created_at),
                d.body.opening_float,
            )
            for d in opens
            if isinstance(d, ShiftOpen)
        ]
        await conn.execute(_OPEN_SHIFTS, *_columns(open_rows, 7))
    if closes:
        close_rows = [_close_row(d) for d in closes if isinstance(d, ShiftClose)]
        await conn.execute(_CLOSE_SHIFTS, *_columns(close_rows, 19))


def _close_row(d: ShiftClose) -> tuple[Any, ...]:
    b = d.body
    return (
        d.register_id,
        b.shift_no,
        d.center_id,
        b.currency,
        d.seq,
        timestamp(d.created_at),
        b.z_number,
        b.first_seq,
        b.last_seq,
        b.receipt_count,
        b.refund_count,
        b.void_count,
        b.gross_sales,
        b.refunds_total,
        b.net_total,
        b.cash_expected,
        b.cash_counted,
        json.dumps([p.model_dump(mode="json") for p in b.payments]),
        json.dumps([t.model_dump(mode="json") for t in b.taxes]),
    )
