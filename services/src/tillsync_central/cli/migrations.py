"""``tillsync-central migrate``: apply the pending migrations, or show their state."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from ..db import MigrationError, MigrationStatus, migration_status
from ..settings import CentralSettings, redact_url
from ._common import ConfigOption, _connect, _log, _migrate, _out, _reported_errors, _settings, app


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
