"""The audit log: every write through the admin API, who, what, when and on what."""

from __future__ import annotations

from typing import Any

import asyncpg

from ..dead_letters import Conn, json_safe

__all__ = ["AUDIT_PAGE", "recent", "record"]

AUDIT_PAGE = 100

_INSERT = "INSERT INTO audit_log (username, action, target, details) VALUES ($1, $2, $3, $4)"
_RECENT = """
SELECT id, at, username, action, target, details FROM audit_log
WHERE $1::bigint IS NULL OR id < $1
ORDER BY id DESC LIMIT $2
"""


async def record(
    conn: Conn | asyncpg.Pool, username: str, action: str, target: str, details: dict[str, Any]
) -> None:
    """One audit row, in the caller's transaction when it has one."""
    await conn.execute(_INSERT, username, action, target, json_safe(details))


async def recent(pool: asyncpg.Pool, before: int | None, limit: int) -> list[dict[str, Any]]:
    rows = await pool.fetch(_RECENT, before, limit)
    return [
        {
            "id": r["id"],
            "at": r["at"].isoformat(),
            "username": r["username"],
            "action": r["action"],
            "target": r["target"],
            "details": r["details"],
        }
        for r in rows
    ]
