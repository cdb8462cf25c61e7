"""The ``tillsync-central`` command.

Each command builds the settings once (``--config FILE``, ``TILLSYNC_*`` variables),
configures logging, and runs one coroutine. Errors are printed as code, field and reason
on stderr, with exit status 1 (2 for usage errors, as Typer does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import asyncpg
import structlog
import typer
from rich.console import Console
from rich.table import Table

from tillsync_protocol import TillsyncError

from .db import MigrationError, MigrationStatus, connect, migrate, migration_status
from .logs import configure_logging
from .settings import CentralSettings, load_settings, redact_url

__all__ = ["app", "main"]

app = typer.Typer(
    name="tillsync-central",
    help="tillsync central: database migrations and the central workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)
_log = structlog.get_logger(__name__)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML settings file (default: $TILLSYNC_CONFIG); TILLSYNC_* variables override it.",
        dir_okay=False,
    ),
]


class DatabaseUnavailableError(TillsyncError):
    """PostgreSQL could not be reached or refused the connection."""

    code = "database_unavailable"


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn a ``TillsyncError`` into a one-line report on stderr and exit status 1."""
    try:
        yield
    except TillsyncError as exc:
        _err.print(
            f"[bold red]error[/] code={exc.code} field={exc.field or '-'} reason={exc.reason}",
            markup=True,
            highlight=False,
        )
        raise typer.Exit(1) from None


def _settings(config: Path | None) -> CentralSettings:
    settings = load_settings(config)
    configure_logging(settings.log_format, settings.log_level)
    return settings


async def _connect(settings: CentralSettings) -> asyncpg.Connection:
    try:
        return await connect(settings)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailableError(
            f"cannot connect to {redact_url(settings.database_url)}: {exc}",
            field="database_url",
        ) from exc


async def _migrate(settings: CentralSettings) -> list[str]:
    conn = await _connect(settings)
    try:
        return await migrate(conn, lock_timeout=settings.migration_lock_timeout)
    finally:
        await conn.close()


async def _status(settings: CentralSettings) -> list[MigrationStatus]:
    conn = await _connect(settings)
    try:
        return await migration_status(conn)
    finally:
        await conn.close()


def _status_table(statuses: list[MigrationStatus]) -> Table:
    table = Table("version", "name", "state", "applied at")
    colours = {"applied": "green", "pending": "yellow", "changed": "red", "unknown": "red"}
    for status in statuses:
        applied_at = "" if status.applied_at is None else status.applied_at.isoformat()
        state = f"[{colours[status.state]}]{status.state}[/]"
        table.add_row(f"{status.version:04d}", status.name, state, applied_at)
    return table


@app.callback()
def _root() -> None:
    """tillsync central: database migrations and the central workers."""
    # A callback keeps `migrate` a subcommand while it is the only one.


@app.command("migrate")
def migrate_command(
    config: ConfigOption = None,
    status: Annotated[
        bool, typer.Option("--status", help="Show each migration's state; change nothing.")
    ] = False,
) -> None:
    """Apply the pending database migrations (safe to run from several hosts at once)."""
    with _reported_errors():
        settings = _settings(config)
        if status:
            statuses = asyncio.run(_status(settings))
            _out.print(_status_table(statuses))
            if any(s.state in ("changed", "unknown") for s in statuses):
                raise MigrationError(
                    "the database and this program's migrations disagree (see above)",
                    code="migration_checksum_mismatch"
                    if any(s.state == "changed" for s in statuses)
                    else "migration_unknown",
                )
            return
        applied = asyncio.run(_migrate(settings))
        _log.info("migrated", applied=applied, database=redact_url(settings.database_url))
        if not applied:
            _out.print("database is up to date")
        for name in applied:
            _out.print(f"applied {name}", highlight=False)


# Long-running commands (`run`: ingest, relay, RPC, presence, admin API) are added here,
# each as `@app.command()` wrapping its body in `_reported_errors()` and `_settings()`.


def main() -> None:
    """Entry point of the ``tillsync-central`` script."""
    app()
