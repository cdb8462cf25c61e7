"""PostgreSQL of central: the connection pool and the schema migrations."""

from .migrate import (
    MIGRATION_LOCK_KEY,
    Migration,
    MigrationError,
    MigrationState,
    MigrationStatus,
    load_migrations,
    migrate,
    migration_status,
)
from .pool import connect, create_pool, init_connection

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Migration",
    "MigrationError",
    "MigrationState",
    "MigrationStatus",
    "connect",
    "create_pool",
    "init_connection",
    "load_migrations",
    "migrate",
    "migration_status",
]
