"""The sync history: every catalog delta and reinit, with its result, in ``sync_runs``.

A run is written when it starts (``finished_at`` and ``result`` empty) and completed when
it ends. A run that never ended (the agent was killed) is marked ``failed`` with the
error ``interrupted`` when the agent next opens the database. ``tillsync-agent history``
reads the table read-only.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Literal

import aiosqlite

from .outbox import now_ms
from .store import Store

__all__ = ["History", "SyncKind", "SyncResult", "SyncRun", "read_runs"]

SyncKind = Literal["documents", "catalog_delta", "reinit"]
SyncResult = Literal["successful", "partially_successful", "failed"]

_START = "INSERT INTO sync_runs (kind, started_at, detail) VALUES (?, ?, ?)"
_FINISH = """
UPDATE sync_runs SET finished_at = ?, result = ?, sent = ?, received = ?, errors = ?, detail = ?
WHERE id = ?
"""
_INTERRUPTED = """
UPDATE sync_runs SET finished_at = ?, result = 'failed',
    errors = '["interrupted: the agent stopped or was killed during the run"]'
WHERE finished_at IS NULL
"""
_RECENT = """
SELECT id, kind, started_at, finished_at, result, sent, received, errors, detail
FROM sync_runs ORDER BY id DESC LIMIT ?
"""
_LAST_FINISHED = """
SELECT id, kind, started_at, finished_at, result, sent, received, errors, detail
FROM sync_runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1
"""


@dataclass(frozen=True)
class SyncRun:
    id: int
    kind: str
    started_at: int
    finished_at: int | None
    result: str | None
    sent: int = 0
    received: int = 0
    errors: list[str] = field(default_factory=list)
    detail: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _run(row: tuple[object, ...] | sqlite3.Row) -> SyncRun:
    id_, kind, started, finished, result, sent, received, errors, detail = tuple(row)
    return SyncRun(
        id=int(str(id_)),
        kind=str(kind),
        started_at=int(str(started)),
        finished_at=None if finished is None else int(str(finished)),
        result=None if result is None else str(result),
        sent=int(str(sent)),
        received=int(str(received)),
        errors=json.loads(str(errors)),
        detail=json.loads(str(detail)) if detail else {},
    )


class History:
    """Writes ``sync_runs`` through the store's one writer connection."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.last: SyncRun | None = None
        """The last finished run (for ``status`` and heartbeats)."""

    async def load(self) -> None:
        """Close the runs an earlier process left open, and remember the last finished one."""

        async def interrupted(db: aiosqlite.Connection) -> None:
            await db.execute(_INTERRUPTED, (now_ms(),))

        await self._store.write(interrupted)
        async with self._store.db.execute(_LAST_FINISHED) as cursor:
            row = await cursor.fetchone()
        self.last = None if row is None else _run(tuple(row))

    async def start(self, kind: SyncKind, detail: dict[str, object]) -> int:
        started = now_ms()

        async def insert(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(_START, (kind, started, json.dumps(detail)))
            return int(cursor.lastrowid or 0)

        return await self._store.write(insert)

    async def finish(
        self,
        run_id: int,
        *,
        kind: SyncKind,
        started_at: int,
        result: SyncResult,
        sent: int,
        received: int,
        errors: list[str],
        detail: dict[str, object],
    ) -> SyncRun:
        run = SyncRun(
            run_id, kind, started_at, now_ms(), result, sent, received, list(errors), dict(detail)
        )

        async def update(db: aiosqlite.Connection) -> None:
            await db.execute(
                _FINISH,
                (
                    run.finished_at,
                    result,
                    sent,
                    received,
                    json.dumps(run.errors),
                    json.dumps(detail),
                    run_id,
                ),
            )

        await self._store.write(update)
        self.last = run
        return run


def read_runs(db: sqlite3.Connection, limit: int = 50) -> list[SyncRun]:
    """The latest runs, newest first, from a (read-only) connection."""
    return [_run(row) for row in db.execute(_RECENT, (limit,)).fetchall()]
