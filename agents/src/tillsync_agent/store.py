"""The agent's SQLite database: schema, pragmas and the one writer connection.

Exactly one connection writes (SQLite 3.40's WAL-reset bug needs two writers, and one
writer makes ``seq`` trivially dense). A lock file next to the database makes a second
writer process fail fast instead of racing. Readers (``tillsync-agent status``) open the
file read-only.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path
from types import TracebackType

import aiosqlite

from tillsync_protocol import ConfigError

__all__ = ["SCHEMA_VERSION", "Store", "StoreLockedError", "open_readonly"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY,
    doc_id          TEXT    NOT NULL UNIQUE,
    doc_type        TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,           -- ms since epoch, as in the envelope
    shift_no        INTEGER,
    payload         BLOB    NOT NULL,           -- the exact bytes published
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'published', 'acknowledged', 'rejected')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_sent_at    INTEGER,
    next_attempt_at INTEGER,
    acked_at        INTEGER,
    reject_code     TEXT,
    reject_field    TEXT,
    reject_reason   TEXT
);
-- What the sender looks at: only rows not yet acknowledged or rejected.
CREATE INDEX IF NOT EXISTS outbox_open ON outbox (state, next_attempt_at, seq)
    WHERE state IN ('pending', 'published');
-- Exact counts, kept in the same transactions that change the outbox: O(1) to read.
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES
    ('last_seq', 0), ('pending', 0), ('acknowledged', 0), ('rejected', 0);
CREATE TABLE IF NOT EXISTS agent_state (
    key   TEXT PRIMARY KEY,
    value TEXT
);
"""


class StoreLockedError(ConfigError):
    code = "store_locked"


class Store:
    """The writer connection to the agent database, as an async context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _take_lock(self.path.with_suffix(self.path.suffix + ".lock"))
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            # FULL: a till loses power; NORMAL in WAL mode may lose the last commits.
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._db.execute("PRAGMA busy_timeout=5000")
            await self._db.executescript(_SCHEMA)
            await self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _take_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(
            f"{path.parent} is in use by another agent process (the service?); "
            "submit through the running agent instead",
            field="data_dir",
        ) from None
    return fd


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection for status queries from another process."""
    if not path.exists():
        raise ConfigError(f"no agent database at {path}", field="data_dir")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
