"""The sync history: every documents sweep, catalog delta and reinit, with its result, in
``sync_runs``.

A run is written when it starts (``finished_at`` and ``result`` empty) and completed when
it ends. A run that never ended (the agent was killed) is marked ``failed`` with the
error ``interrupted`` when the agent next opens the database. ``tillsync-agent history``
reads the table read-only; :meth:`History.on_finish` callbacks (the local API's event
stream) hear of every run that ends.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import aiosqlite
import structlog

from .outbox import now_ms
from .store import Store

__all__ = ["History", "SyncKind", "SyncResult", "SyncRun", "read_runs", "read_runs_async"]

log = structlog.get_logger(__name__)

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
_COLUMNS = "id, kind, started_at, finished_at, result, sent, received, errors, detail"
_RECENT = f"SELECT {_COLUMNS} FROM sync_runs ORDER BY id DESC LIMIT ?"
_RECENT_OF_KIND = f"SELECT {_COLUMNS} FROM sync_runs WHERE kind = ? ORDER BY id DESC LIMIT ?"
_LAST_FINISHED = f"""
SELECT {_COLUMNS} FROM sync_runs
WHERE id IN (SELECT MAX(id) FROM sync_runs WHERE finished_at IS NOT NULL GROUP BY kind)
ORDER BY id
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
        """The last finished run of any kind (for ``status`` and heartbeats)."""
        self._last_of: dict[str, SyncRun] = {}
        self.on_finish: list[Callable[[SyncRun], None]] = []
        """Called with every run that ends, right after it is written."""

    def last_of(self, *kinds: SyncKind) -> SyncRun | None:
        """The last finished run of one of ``kinds``."""
        runs = [self._last_of[kind] for kind in kinds if kind in self._last_of]
        return max(runs, key=lambda run: run.id, default=None)

    async def load(self) -> None:
        """Close the runs an earlier process left open, and remember the last finished one."""

        async def interrupted(db: aiosqlite.Connection) -> None:
            await db.execute(_INTERRUPTED, (now_ms(),))

        await self._store.write(interrupted)
        async with self._store.db.execute(_LAST_FINISHED) as cursor:
            runs = [_run(tuple(row)) for row in await cursor.fetchall()]
        self._last_of = {run.kind: run for run in runs}
        self.last = runs[-1] if runs else None

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
        self._last_of[kind] = run
        for callback in list(self.on_finish):
            try:
                callback(run)
            except Exception as exc:  # a listener's bug must not fail the sync
                log.error("sync history callback failed", error=repr(exc))
        return run


def read_runs(db: sqlite3.Connection, limit: int = 50, kind: str | None = None) -> list[SyncRun]:
    """The latest runs (of ``kind``, if given), newest first, from a (read-only) connection."""
    sql, params = (_RECENT, (limit,)) if kind is None else (_RECENT_OF_KIND, (kind, limit))
    return [_run(row) for row in db.execute(sql, params).fetchall()]


async def read_runs_async(
    db: aiosqlite.Connection, limit: int = 50, kind: str | None = None
) -> list[SyncRun]:
    """The latest runs (of ``kind``, if given), newest first, from a read-only connection."""
    sql, params = (_RECENT, (limit,)) if kind is None else (_RECENT_OF_KIND, (kind, limit))
    async with db.execute(sql, params) as cursor:
        return [_run(tuple(row)) for row in await cursor.fetchall()]
