"""The agent's SQLite database: schema, pragmas and the one writer connection.

Exactly one connection writes (SQLite 3.40's WAL-reset bug needs two writers, and one
writer makes ``seq`` trivially dense). A lock file next to the database makes a second
writer process fail fast instead of racing. Within the process, every write transaction
(outbox, catalog replica, sync history) runs under :attr:`Store.write_lock`, so they never
interleave on the one connection. Readers (``tillsync-agent status``, the replica's query
API) open the file read-only and see committed snapshots only.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import aiosqlite

from tillsync_protocol import ConfigError

from .process import no_wakeup_preemption

__all__ = [
    "CATALOG_TABLE",
    "SCHEMA_VERSION",
    "Store",
    "StoreLockedError",
    "open_readonly",
    "open_readonly_async",
    "rollback",
    "transaction",
]

SCHEMA_VERSION = 3
"""2 → 3: ``catalog_shadow`` without ``request_id`` (``catalog_staging`` names the staged
request), ``catalog_next`` and its companions for a replace."""

T = TypeVar("T")

CATALOG_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    entity     TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    scope      TEXT    NOT NULL,                -- 'global' or this register's center
    version    INTEGER NOT NULL,                -- central's version of the row
    scope_seq  INTEGER NOT NULL,                -- changelog position of its latest change
    state      TEXT    NOT NULL,                -- JSON object
    local_edit INTEGER NOT NULL DEFAULT 0 CHECK (local_edit IN (0, 1)),
    PRIMARY KEY (entity, key, scope)
);
"""
"""The replica's ``catalog`` table; a replace stages into one of the same definition
(``catalog_next``) and renames it."""

_SCHEMA_TEMPLATE = """
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

-- The catalog replica (docs/catalog.md, "Register replica schema"). Read-only for POS apps.
{catalog}CREATE TABLE IF NOT EXISTS catalog_cursors (
    scope TEXT PRIMARY KEY,
    seq   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS item_barcodes (
    barcode  TEXT PRIMARY KEY,
    item_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS item_barcodes_item ON item_barcodes (item_key);
-- What is staged: at most one delta or reinit at a time (the request whose pages the
-- tables below hold). Pages land in their own short transactions and are applied (or, for
-- a replace, swapped in) with the new cursors in one transaction at delta_end. Everything
-- an interrupted run staged is cleared when the next one starts, so a kill midway leaves
-- the catalog as it was.
CREATE TABLE IF NOT EXISTS catalog_staging (
    request_id TEXT    NOT NULL PRIMARY KEY,
    mode       TEXT    NOT NULL CHECK (mode IN ('delta', 'update', 'replace')),
    started_at INTEGER NOT NULL                 -- ms since epoch
);
-- A delta or update: its changes, merged row by row at delta_end.
CREATE TABLE IF NOT EXISTS catalog_shadow (
    page_no    INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    entity     TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    scope      TEXT    NOT NULL,
    op         TEXT    NOT NULL CHECK (op IN ('upsert', 'delete')),
    version    INTEGER NOT NULL,
    scope_seq  INTEGER NOT NULL,
    state      TEXT,
    kept       INTEGER NOT NULL CHECK (kept IN (0, 1)),  -- 0: filtered out by labels
    PRIMARY KEY (page_no, idx)
);
CREATE INDEX IF NOT EXISTS catalog_shadow_key
    ON catalog_shadow (entity, key, scope, scope_seq);
-- A replace: the next catalog itself (the latest change of each key), renamed to catalog
-- at delta_end; the barcodes of its items (a center row's win, then the greatest key, as
-- item_barcodes); the staged deletes and rows filtered out by labels, if any.
{catalog_next}CREATE TABLE IF NOT EXISTS item_barcodes_next (
    barcode  TEXT    PRIMARY KEY,
    item_key TEXT    NOT NULL,
    center   INTEGER NOT NULL CHECK (center IN (0, 1))  -- 1: from the center's row
);
CREATE TABLE IF NOT EXISTS catalog_next_drops (
    entity    TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    scope     TEXT    NOT NULL,
    scope_seq INTEGER NOT NULL
);
-- Every catalog delta and reinit (and later document syncs), with its result.
CREATE TABLE IF NOT EXISTS sync_runs (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL CHECK (kind IN ('documents', 'catalog_delta', 'reinit')),
    started_at  INTEGER NOT NULL,               -- ms since epoch
    finished_at INTEGER,                        -- NULL while running (or if killed)
    result      TEXT CHECK (result IN ('successful', 'partially_successful', 'failed')),
    sent        INTEGER NOT NULL DEFAULT 0,
    received    INTEGER NOT NULL DEFAULT 0,
    errors      TEXT    NOT NULL DEFAULT '[]',  -- JSON list of strings
    detail      TEXT                            -- JSON object: trigger, mode, cursors…
);
"""

_SCHEMA = _SCHEMA_TEMPLATE.replace(
    "{catalog}", CATALOG_TABLE.format(name="catalog").lstrip("\n")
).replace("{catalog_next}", CATALOG_TABLE.format(name="catalog_next").lstrip("\n"))

# Run before the schema is (re)created in a database an older agent left (user_version
# below 3, or 0 if it predates versions): catalog_shadow was keyed by request_id. Only its
# rows go, which are transient (what an interrupted run staged).
_UPGRADE_TO_3 = "DROP TABLE IF EXISTS catalog_shadow;"


class StoreLockedError(ConfigError):
    code = "store_locked"


class Store:
    """The writer connection to the agent database, as an async context manager."""

    def __init__(self, path: Path, *, gate: asyncio.Semaphore | None = None) -> None:
        self.path = path
        self._gate = gate
        """Shared by the agents one process hosts (see :class:`~tillsync_agent.Agent`'s
        ``sqlite_gate``): at most that many of their one-hop calls run at once."""
        self._db: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self.write_lock = asyncio.Lock()
        """Held by every write transaction on :attr:`db` (the outbox's and :meth:`write`)."""

    @property
    def is_open(self) -> bool:
        return self._db is not None

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
            await self._migrate(self._db)
            # The connection's thread must not preempt the event loop when handed work.
            await self._hop(lambda _: no_wakeup_preemption())
        except BaseException:
            await self.close()
            raise

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        """Create the schema, or upgrade a database an older agent left, in one transaction
        (a kill midway leaves it as it was)."""
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the agent database has schema version {version}, newer than this agent's "
                f"{SCHEMA_VERSION}: run the newer agent, or move the data directory aside",
                field="data_dir",
            )
        before = _UPGRADE_TO_3 if version < 3 else ""
        await db.executescript(
            f"BEGIN IMMEDIATE;\n{before}\n{_SCHEMA}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
        )

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def write(
        self,
        work: Callable[[aiosqlite.Connection], Awaitable[T]],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``work(db)`` in one ``BEGIN IMMEDIATE`` … ``COMMIT`` under :attr:`write_lock`
        (rolled back on any error), then ``after(result)``.

        It runs to completion even if the caller is cancelled, as the outbox's writes do: a
        cancellation between COMMIT and ``after`` (which updates what is kept in memory)
        would leave memory behind the database.
        """

        async def locked() -> T:
            async with self.write_lock:
                db = self.db
                await db.execute("BEGIN IMMEDIATE")
                try:
                    result = await work(db)
                    await db.execute("COMMIT")
                except BaseException:
                    await rollback(db)
                    raise
                if after is not None:
                    after(result)
                return result

        return await asyncio.shield(locked())

    async def write_in_thread(
        self,
        work: Callable[[sqlite3.Connection], T],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """As :meth:`write`, but the whole transaction (``BEGIN IMMEDIATE``, ``work``,
        ``COMMIT``) runs as one call on the connection's thread: one hop to that thread and
        back instead of one per statement (each hop costs a thread wake-up and a wake-up of
        the event loop, about 50 µs of CPU; a five-statement transaction costs a third)."""

        async def locked() -> T:
            async with self.write_lock:
                result = await self.in_thread(lambda db: transaction(db, work))
                if after is not None:
                    after(result)
                return result

        return await asyncio.shield(locked())

    async def in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(connection)`` on the connection's thread, in one hop: for reads (no
        lock; writes go through :meth:`write` or :meth:`write_in_thread`).

        With a gate it waits for a place first. Nothing waits for anything else while it
        holds one (the call is a single function on the thread), so a shared gate cannot
        deadlock: :attr:`write_lock` is always taken before it, never after."""
        if self._gate is None:
            return await self._hop(work)
        async with self._gate:
            return await self._hop(work)

    async def _hop(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self.db
        # aiosqlite runs a callable on its thread only through _execute (no public way).
        result: T = await db._execute(work, db._conn)  # type: ignore[no-untyped-call]
        return result

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


async def rollback(db: aiosqlite.Connection) -> None:
    try:
        await db.execute("ROLLBACK")
    except Exception:  # no transaction open: nothing to undo
        pass


def transaction(
    db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T], *, durable: bool = True
) -> T:
    """``work`` in one ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on any error); runs
    on the connection's thread.

    ``durable=False`` commits this one transaction with ``synchronous=NORMAL`` (no fsync of
    the WAL) and restores ``FULL`` after it, for writes that may be lost and are redone
    (the sender's publish records). In WAL mode that is still crash-safe: an application
    crash (SIGKILL) loses nothing, a power loss may take back only the last commits, and
    never corrupts the file; the WAL is append-only, so the next ``FULL`` commit's fsync
    makes this transaction durable as well (SQLite's ``PRAGMA synchronous`` and WAL
    documentation)."""
    if not durable:
        db.execute("PRAGMA synchronous=NORMAL")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        if not durable:
            db.execute("PRAGMA synchronous=FULL")
    return result


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection for status queries from another process."""
    if not path.exists():
        raise ConfigError(f"no agent database at {path}", field="data_dir")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


async def open_readonly_async(path: Path) -> aiosqlite.Connection:
    """A read-only connection (it sees committed snapshots only; never a second writer)."""
    if not path.exists():  # noqa: ASYNC240 - one stat, before the connection's thread exists
        raise ConfigError(f"no agent database at {path}", field="data_dir")
    return await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
