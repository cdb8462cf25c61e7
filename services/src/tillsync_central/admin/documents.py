"""Documents for the dashboard: the document list (keyset-paged, filtered by center,
register, type and day), receipt totals per center, register and day, Z-reports (closed
shifts) and one document's detail with its decoded payload and raw bytes.

Money stays integer minor units (``bigint`` sums come back as ``int``); pages format it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

__all__ = [
    "DocumentQuery",
    "document_detail",
    "document_page",
    "receipt_days",
    "zreport_page",
]

_DOCUMENTS = """
SELECT d.register_id, d.seq, d.doc_id::text AS doc_id, d.center_id, d.doc_type, d.created_at,
       d.received_at, r.receipt_no, r.currency, r.total, r.line_count
FROM documents d LEFT JOIN receipts r USING (register_id, seq)
WHERE ($1::text IS NULL OR d.center_id = $1)
  AND ($2::text IS NULL OR d.register_id = $2)
  AND ($3::text IS NULL OR d.doc_type = $3)
  AND ($4::timestamptz IS NULL OR d.created_at >= $4)
  AND ($5::timestamptz IS NULL OR d.created_at < $5)
  AND ($6::timestamptz IS NULL OR (d.created_at, d.register_id, d.seq) < ($6, $7, $8))
ORDER BY d.created_at DESC, d.register_id DESC, d.seq DESC
LIMIT $9
"""
# Sums of bigint are numeric: cast back, totals stay integers of minor units.
_DAYS = """
SELECT center_id, register_id, (created_at AT TIME ZONE 'UTC')::date AS day, currency,
       count(*) FILTER (WHERE kind = 'receipt') AS receipts,
       count(*) FILTER (WHERE kind = 'refund') AS refunds,
       coalesce(sum(total) FILTER (WHERE kind = 'receipt'), 0)::bigint AS sales,
       coalesce(sum(total) FILTER (WHERE kind = 'refund'), 0)::bigint AS refunded
FROM receipts
WHERE ($1::text IS NULL OR center_id = $1)
  AND ($2::text IS NULL OR register_id = $2)
  AND created_at >= $3 AND created_at < $4
GROUP BY center_id, register_id, day, currency
ORDER BY day DESC, center_id, register_id, currency
LIMIT 1000
"""
_ZREPORTS = """
SELECT register_id, shift_no, center_id, currency, opened_at, closed_at, z_number,
       receipt_count, refund_count, void_count, gross_sales, refunds_total, net_total,
       cash_expected, cash_counted, first_seq, last_seq, closed_seq,
       got.receipts_received, got.net_received, z.status AS reconciliation,
       z.differences
FROM shifts s
LEFT JOIN shift_reconciliations z USING (register_id, shift_no)
CROSS JOIN LATERAL (
    SELECT count(*) AS receipts_received,
           (coalesce(sum(r.total) FILTER (WHERE r.kind = 'receipt'), 0)
            - coalesce(sum(r.total) FILTER (WHERE r.kind = 'refund'), 0))::bigint
           AS net_received
    FROM receipts r WHERE r.register_id = s.register_id AND r.shift_no = s.shift_no
) got
WHERE closed_at IS NOT NULL
  AND ($1::text IS NULL OR center_id = $1)
  AND ($2::text IS NULL OR register_id = $2)
  AND ($3::timestamptz IS NULL OR closed_at >= $3)
  AND ($4::timestamptz IS NULL OR closed_at < $4)
ORDER BY closed_at DESC, register_id
LIMIT $5 OFFSET $6
"""
_ONE = """
SELECT d.register_id, d.seq, d.doc_id::text AS doc_id, d.center_id, d.doc_type, d.created_at,
       d.received_at, d.payload, d.payload_json, encode(d.content_hash, 'hex') AS content_hash
FROM documents d WHERE d.register_id = $1 AND d.seq = $2
"""


@dataclass(frozen=True)
class DocumentQuery:
    center: str | None = None
    register: str | None = None
    doc_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: tuple[datetime, str, int] | None = None
    """The last row of the previous page: (created_at, register_id, seq)."""
    limit: int = 50


def _iso(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    for key in keys:
        value = row.get(key)
        if isinstance(value, datetime):
            row[key] = value.isoformat()
    return row


async def document_page(
    pool: asyncpg.Pool, query: DocumentQuery
) -> tuple[list[dict[str, Any]], tuple[datetime, str, int] | None]:
    """One page, newest first, and the key to continue after it (None on the last page)."""
    after = query.after or (None, None, None)
    records = await pool.fetch(
        _DOCUMENTS,
        query.center,
        query.register,
        query.doc_type,
        query.since,
        query.until,
        *after,
        query.limit + 1,
    )
    more = len(records) > query.limit
    records = records[: query.limit]
    last = records[-1] if more and records else None
    following = None if last is None else (last["created_at"], last["register_id"], last["seq"])
    return [_iso(dict(r), "created_at", "received_at") for r in records], following


async def receipt_days(
    pool: asyncpg.Pool,
    center: str | None,
    register: str | None,
    since: datetime,
    until: datetime,
) -> list[dict[str, Any]]:
    """Receipt and refund counts and totals per center, register, day and currency."""
    rows = await pool.fetch(_DAYS, center, register, since, until)
    return [{**dict(r), "day": r["day"].isoformat()} for r in rows]


async def zreport_page(
    pool: asyncpg.Pool,
    center: str | None,
    register: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> list[dict[str, Any]]:
    """Closed shifts, newest first, beside what central received of them (receipts and
    refunds, net) and the reconciler's verdict (``ok``, ``mismatch``, ``waiting``)."""
    rows = await pool.fetch(_ZREPORTS, center, register, since, until, limit, offset)
    return [_iso(dict(r), "opened_at", "closed_at") for r in rows]


async def document_detail(pool: asyncpg.Pool, register_id: str, seq: int) -> dict[str, Any] | None:
    """One document: its decoded payload and its exact bytes in hex."""
    row = await pool.fetchrow(_ONE, register_id, seq)
    if row is None:
        return None
    detail = _iso(dict(row), "created_at", "received_at")
    detail["payload_hex"] = bytes(detail.pop("payload")).hex()
    return detail
