"""The fleet view: every register with its presence, pending and rejected counts, catalog
lag and last sync, filtered, sorted and paged in PostgreSQL (one query per page, fast
with thousands of registers), and per-center totals.

A register is ``online`` when its last heartbeat is younger than ``offline_after_s``
(three heartbeat intervals); ``catalog_lag`` is how many changes of its scopes (global
and its center) central has that its cursors do not cover yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

__all__ = ["FLEET_SORTS", "FLEET_STATES", "FleetQuery", "center_totals", "fleet_page"]

FLEET_STATES = ("online", "offline", "never_seen", "revoked")
FLEET_SORTS = {
    "register": "register_id",
    "center": "center_id",
    "state": "state",
    "last_seen": "last_seen",
    "pending": "pending",
    "rejected": "rejected",
    "catalog_lag": "catalog_lag",
    "agent_version": "agent_version",
}

_FLEET = """
WITH fleet AS (
    SELECT r.register_id, r.center_id, r.revoked_at, p.last_seen, p.agent_version,
           p.pending, p.rejected, p.acknowledged, p.last_seq, p.last_sync, p.last_error,
           coalesce(s.last_seq, 0) AS central_last_seq,
           coalesce(s.contiguous_seq, 0) AS central_contiguous_seq,
           CASE WHEN r.revoked_at IS NOT NULL THEN 'revoked'
                WHEN p.last_seen IS NULL THEN 'never_seen'
                WHEN p.last_seen >= now() - make_interval(secs => $1) THEN 'online'
                ELSE 'offline' END AS state,
           CASE WHEN p.register_id IS NULL THEN NULL
                ELSE greatest(g.last_seq - coalesce((p.cursors->>'global')::bigint, 0), 0)
                   + greatest(coalesce(c.last_seq, 0)
                              - coalesce((p.cursors->>r.center_id)::bigint, 0), 0)
           END AS catalog_lag
    FROM registers r
    LEFT JOIN register_presence p USING (register_id)
    LEFT JOIN register_state s USING (register_id)
    LEFT JOIN catalog_scopes g ON g.scope = 'global'
    LEFT JOIN catalog_scopes c ON c.scope = r.center_id
)
SELECT *, count(*) OVER () AS total FROM fleet
WHERE ($2::text IS NULL OR center_id = $2)
  AND ($3::text IS NULL OR state = $3)
  AND ($4::text IS NULL OR strpos(register_id, $4) > 0)
  AND (NOT $5::bool OR catalog_lag > 0 OR state = 'offline')
ORDER BY {sort} {direction} NULLS LAST, register_id
LIMIT $6 OFFSET $7
"""
_CENTERS = """
SELECT r.center_id, count(*) AS registers,
       count(*) FILTER (WHERE r.revoked_at IS NULL
                        AND p.last_seen >= now() - make_interval(secs => $1)) AS online,
       count(*) FILTER (WHERE r.revoked_at IS NULL
                        AND p.last_seen < now() - make_interval(secs => $1)) AS offline,
       coalesce(sum(p.pending), 0)::bigint AS pending,
       coalesce(sum(p.rejected), 0)::bigint AS rejected
FROM registers r LEFT JOIN register_presence p USING (register_id)
GROUP BY r.center_id ORDER BY r.center_id
"""


@dataclass(frozen=True)
class FleetQuery:
    center: str | None = None
    state: str | None = None
    search: str | None = None
    attention: bool = False
    """Only registers that are offline or lag behind the catalog."""
    sort: str = "register"
    descending: bool = False
    limit: int = 100
    offset: int = 0


def _row(record: asyncpg.Record) -> dict[str, Any]:
    row = dict(record)
    row.pop("total", None)
    for key in ("revoked_at", "last_seen"):
        row[key] = None if row[key] is None else row[key].isoformat()
    return row


async def fleet_page(
    pool: asyncpg.Pool, offline_after_s: float, query: FleetQuery
) -> tuple[list[dict[str, Any]], int]:
    """One page of the fleet and how many registers match the filters."""
    sql = _FLEET.format(
        sort=FLEET_SORTS[query.sort], direction="DESC" if query.descending else "ASC"
    )
    rows = await pool.fetch(
        sql,
        float(offline_after_s),
        query.center,
        query.state,
        query.search,
        query.attention,
        query.limit,
        query.offset,
    )
    total = int(rows[0]["total"]) if rows else 0
    return [_row(r) for r in rows], total


async def center_totals(pool: asyncpg.Pool, offline_after_s: float) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch(_CENTERS, float(offline_after_s))]
