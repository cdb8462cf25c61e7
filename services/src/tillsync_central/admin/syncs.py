"""Sync history per register: every sync summary central saw in a heartbeat (kept in
``register_syncs`` by the trigger of migration 0004), newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

__all__ = ["SYNC_KINDS", "SYNC_RESULTS", "sync_page"]

SYNC_KINDS = ("documents", "catalog_delta", "reinit")
SYNC_RESULTS = ("successful", "partially_successful", "failed")

_SYNCS = """
SELECT s.register_id, r.center_id, s.kind, s.result, s.started_at, s.finished_at, s.sent,
       s.received, s.errors, s.last_error, s.seen_at
FROM register_syncs s JOIN registers r USING (register_id)
WHERE ($1::text IS NULL OR s.register_id = $1)
  AND ($2::text IS NULL OR r.center_id = $2)
  AND ($3::text IS NULL OR s.kind = $3)
  AND ($4::text IS NULL OR s.result = $4)
  AND ($5::timestamptz IS NULL OR s.finished_at >= $5)
  AND ($6::timestamptz IS NULL OR s.started_at < $6)
ORDER BY s.started_at DESC, s.register_id
LIMIT $7 OFFSET $8
"""


async def sync_page(
    pool: asyncpg.Pool,
    *,
    register: str | None = None,
    center: str | None = None,
    kind: str | None = None,
    result: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    rows = await pool.fetch(_SYNCS, register, center, kind, result, since, until, limit, offset)
    return [
        {k: v.isoformat() if isinstance(v, datetime) else v for k, v in dict(r).items()}
        for r in rows
    ]
