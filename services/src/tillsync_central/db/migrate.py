"""Schema migrations: numbered ``.sql`` files applied in order, once, by whoever starts first.

The files live in ``tillsync_central/db/migrations/`` and are named ``NNNN_name.sql``.
Each file runs in its own transaction together with the row recording it in
``schema_migrations``; a session advisory lock is held around the whole run, so workers
starting together apply every file exactly once and the others wait, then find nothing
to do. A file is never edited once applied: its SHA-256 is recorded, and a run that finds
a different one refuses to start (``migration_checksum_mismatch``). Change the schema
with a new file instead.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from importlib.abc import Traversable
from importlib.resources import files
from pathlib import Path
from typing import Literal

import asyncpg
import structlog

from tillsync_protocol import ConfigError

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Migration",
    "MigrationError",
    "MigrationState",
    "MigrationStatus",
    "load_migrations",
    "migrate",
    "migration_status",
]

MIGRATION_LOCK_KEY = int.from_bytes(b"tillsync", "big")
"""The ``pg_advisory_lock`` key held while migrating (the bytes of "tillsync")."""

_log = structlog.get_logger(__name__)

_FILE_NAME = re.compile(r"^(?P<version>[0-9]{4})_(?P<slug>[a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL UNIQUE,
    checksum   bytea       NOT NULL CHECK (octet_length(checksum) = 32),
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_TABLE_EXISTS = "SELECT to_regclass('schema_migrations') IS NOT NULL"
_SELECT_APPLIED = (
    "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
)
_INSERT_APPLIED = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
_LOCK = "SELECT pg_advisory_lock($1)"
_UNLOCK = "SELECT pg_advisory_unlock($1)"

MigrationState = Literal["applied", "pending", "changed", "unknown"]


class MigrationError(ConfigError):
    """The database's migrations and this program's files do not agree, or cannot run.

    ``code`` is one of ``migration_checksum_mismatch`` (an applied file was edited),
    ``migration_unknown`` (the database has a migration this program does not know: it is
    older than the schema), ``migration_invalid`` (a badly named or duplicate file),
    ``migration_lock_timeout`` (another process held the lock too long) and
    ``migration_failed`` (a file's SQL failed; its transaction was rolled back).
    """

    code = "migration_error"


@dataclass(frozen=True)
class Migration:
    """One file of the migrations folder."""

    version: int
    name: str
    sql: str
    checksum: bytes


@dataclass(frozen=True)
class MigrationStatus:
    """Where one migration stands in one database."""

    version: int
    name: str
    state: MigrationState
    applied_at: datetime | None


def _default_dir() -> Traversable:
    return files("tillsync_central.db").joinpath("migrations")


def load_migrations(migrations_dir: Traversable | Path | None = None) -> list[Migration]:
    """The ``NNNN_name.sql`` files of the folder, by version; other files are ignored."""
    folder = _default_dir() if migrations_dir is None else migrations_dir
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(
                f"{entry.name}: migration files are named NNNN_lowercase_name.sql",
                field=entry.name,
                code="migration_invalid",
            )
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"{entry.name} and {found[version].name} share version {version}",
                field=entry.name,
                code="migration_invalid",
            )
        data = entry.read_bytes()
        found[version] = Migration(
            version=version,
            name=entry.name.removesuffix(".sql"),
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).digest(),
        )
    return [found[version] for version in sorted(found)]


@asynccontextmanager
async def _connection(conn_or_dsn: asyncpg.Connection | str) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(conn_or_dsn, str):
        conn = await asyncpg.connect(conn_or_dsn, timeout=30)
        try:
            yield conn
        finally:
            await conn.close()
    else:
        yield conn_or_dsn


def _check_applied(migrations: Sequence[Migration], applied: Sequence[asyncpg.Record]) -> None:
    known = {m.version: m for m in migrations}
    for row in applied:
        migration = known.get(row["version"])
        if migration is None:
            raise MigrationError(
                f"the database has migration {row['name']}, which this program does not "
                "have: run a newer tillsync-central",
                field=row["name"],
                code="migration_unknown",
            )
        if bytes(row["checksum"]) != migration.checksum:
            raise MigrationError(
                f"{migration.name}.sql was changed after it was applied "
                f"(applied sha256 {bytes(row['checksum']).hex()}, file sha256 "
                f"{migration.checksum.hex()}): restore it and put the change in a new file",
                field=migration.name,
                code="migration_checksum_mismatch",
            )


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    started = time.monotonic()
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                _INSERT_APPLIED, migration.version, migration.name, migration.checksum
            )
    except asyncpg.PostgresError as exc:
        raise MigrationError(
            f"{migration.name}.sql failed and was rolled back: "
            f"{exc.__class__.__name__} ({exc.sqlstate}): {exc}",
            field=migration.name,
            code="migration_failed",
        ) from exc
    _log.info(
        "migration_applied",
        migration=migration.name,
        seconds=round(time.monotonic() - started, 3),
    )


async def migrate(
    conn_or_dsn: asyncpg.Connection | str,
    migrations_dir: Traversable | Path | None = None,
    *,
    lock_timeout: float = 300.0,
) -> list[str]:
    """Apply the pending migrations in order; return their names (``[]`` if none).

    Refuses with ``MigrationError`` before applying anything if an applied file changed or
    the database knows a migration this program does not. Waits at most ``lock_timeout``
    seconds for another process that is migrating the same database.
    """
    migrations = load_migrations(migrations_dir)
    async with _connection(conn_or_dsn) as conn:
        try:
            await conn.execute(_LOCK, MIGRATION_LOCK_KEY, timeout=lock_timeout)
        except TimeoutError as exc:
            # The cancel may race a grant: release a lock we might hold (a no-op otherwise).
            with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute(_UNLOCK, MIGRATION_LOCK_KEY)
            raise MigrationError(
                f"another process held the migration lock for over {lock_timeout:g} s",
                code="migration_lock_timeout",
            ) from exc
        try:
            await conn.execute(_CREATE_TABLE)
            applied = await conn.fetch(_SELECT_APPLIED)
            _check_applied(migrations, applied)
            done = {row["version"] for row in applied}
            names: list[str] = []
            for migration in migrations:
                if migration.version not in done:
                    await _apply(conn, migration)
                    names.append(migration.name)
            return names
        finally:
            # If the connection broke, its session ended and the lock with it.
            with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute(_UNLOCK, MIGRATION_LOCK_KEY)


async def migration_status(
    conn_or_dsn: asyncpg.Connection | str,
    migrations_dir: Traversable | Path | None = None,
) -> list[MigrationStatus]:
    """Each migration's state in the database, by version; reads only, takes no lock.

    ``applied`` and ``pending`` are what they say; ``changed`` is an applied file whose
    content differs now; ``unknown`` is applied in the database but absent from the files.
    """
    migrations = load_migrations(migrations_dir)
    async with _connection(conn_or_dsn) as conn:
        applied = await conn.fetch(_SELECT_APPLIED) if await conn.fetchval(_TABLE_EXISTS) else []
    rows = {row["version"]: row for row in applied}
    result: list[MigrationStatus] = []
    for migration in migrations:
        row = rows.pop(migration.version, None)
        if row is None:
            result.append(MigrationStatus(migration.version, migration.name, "pending", None))
        else:
            same = bytes(row["checksum"]) == migration.checksum
            state: MigrationState = "applied" if same else "changed"
            result.append(MigrationStatus(migration.version, row["name"], state, row["applied_at"]))
    for row in rows.values():
        result.append(MigrationStatus(row["version"], row["name"], "unknown", row["applied_at"]))
    return sorted(result, key=lambda status: status.version)
