"""Browsing the central catalog per scope and entity (keyset-paged by key), for the
dashboard's catalog page. Edits go through :class:`tillsync_central.catalog.CatalogEditor`."""

from __future__ import annotations

from typing import Any

import asyncpg

__all__ = ["catalog_page", "catalog_scopes"]

_SCOPES = """
SELECT s.scope, s.last_seq, coalesce(p.published_seq, 0) AS published_seq,
       (SELECT count(*) FROM registers r
        WHERE r.revoked_at IS NULL AND (s.scope = 'global' OR r.center_id = s.scope)) AS registers
FROM catalog_scopes s LEFT JOIN relay_positions p USING (scope)
ORDER BY s.scope <> 'global', s.scope
"""
_ENTITIES = """
SELECT key, version, scope_seq, state, updated_at
FROM catalog_entities
WHERE scope = $1 AND entity = $2 AND NOT deleted
  AND ($3::text IS NULL OR key > $3)
  AND ($4::text IS NULL OR strpos(lower(key), lower($4)) > 0
       OR strpos(lower(coalesce(state->>'name', '')), lower($4)) > 0)
ORDER BY key LIMIT $5
"""


async def catalog_scopes(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """Every scope with its latest change, what the relay published, and its registers."""
    return [dict(r) for r in await pool.fetch(_SCOPES)]


async def catalog_page(
    pool: asyncpg.Pool, scope: str, entity: str, after: str | None, search: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Live rows of one entity in one scope, by key; and the key to continue after."""
    rows = await pool.fetch(_ENTITIES, scope, entity, after, search, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    entries = [{**dict(r), "updated_at": r["updated_at"].isoformat()} for r in rows]
    return entries, rows[-1]["key"] if more and rows else None
