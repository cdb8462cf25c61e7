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

from .db import (
    MigrationError,
    MigrationStatus,
    connect,
    create_pool,
    migrate,
    migration_status,
)
from .logs import configure_logging
from .provisioning import Enrollment, RegisterInfo, Revocation
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


@app.command("run")
def run_command(
    config: ConfigOption = None,
    workers: Annotated[
        int,
        typer.Option("--workers", "-w", min=1, max=256, help="Ingest consumers in this process."),
    ] = 1,
) -> None:
    """Migrate, declare the topology and ingest documents until SIGTERM or SIGINT."""
    from .runner import run

    with _reported_errors():
        settings = _settings(config)
        asyncio.run(run(settings, workers=workers))


registers_app = typer.Typer(help="Enroll, list and revoke registers.", no_args_is_help=True)
app.add_typer(registers_app, name="registers")


async def _add_register(
    settings: CentralSettings, center: str, register: str, password: str | None
) -> Enrollment:
    from .management import Management
    from .provisioning import add_register
    from .runner import declare

    await declare(settings)
    pool = await create_pool(settings)
    try:
        async with Management.from_settings(settings) as management:
            return await add_register(
                pool, management, settings.amqp_url.get_secret_value(), center, register, password
            )
    finally:
        await pool.close()


@registers_app.command("add")
def registers_add(
    center: Annotated[str, typer.Option("--center", help="The register's center (store).")],
    register: Annotated[str, typer.Option("--register", help="The register's id.")],
    password: Annotated[
        str | None, typer.Option("--password", help="Broker password (default: a random one).")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(
            "--bundle", help="Write the agent's settings (TOML, mode 0600) here.", dir_okay=False
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Enroll a register: its rows, its queue, and its broker user with least rights."""
    with _reported_errors():
        settings = _settings(config)
        enrollment = asyncio.run(_add_register(settings, center, register, password))
        _log.info("register enrolled", register_id=register, center_id=center)
        if bundle is not None:
            bundle.touch(mode=0o600, exist_ok=True)
            bundle.chmod(0o600)
            bundle.write_text(enrollment.agent_config(), encoding="utf-8")
            _out.print(f"enrolled {register} in {center}; agent settings written to {bundle}")
        else:
            _out.print(f"enrolled {register} in {center} as broker user {enrollment.broker_user}")
            _out.print(f"amqp_url = {enrollment.amqp_url}", highlight=False, markup=False)


async def _revoke_register(settings: CentralSettings, register: str) -> Revocation:
    from .management import Management
    from .provisioning import revoke_register

    pool = await create_pool(settings)
    try:
        async with Management.from_settings(settings) as management:
            return await revoke_register(pool, management, register)
    finally:
        await pool.close()


@registers_app.command("revoke")
def registers_revoke(
    register: Annotated[str, typer.Argument(help="The register's id.")],
    config: ConfigOption = None,
) -> None:
    """Revoke a register: delete its broker user and close its connections."""
    with _reported_errors():
        settings = _settings(config)
        revocation = asyncio.run(_revoke_register(settings, register))
        _log.info(
            "register revoked",
            register_id=register,
            connections_closed=revocation.connections_closed,
        )
        _out.print(
            f"revoked {register}: broker user {revocation.broker_user} "
            f"{'deleted' if revocation.user_deleted else 'was already gone'}, "
            f"{revocation.connections_closed} connection(s) closed"
        )


async def _list_registers(settings: CentralSettings, center: str | None) -> list[RegisterInfo]:
    from .provisioning import list_registers

    pool = await create_pool(settings)
    try:
        return await list_registers(pool, center)
    finally:
        await pool.close()


@registers_app.command("list")
def registers_list(
    center: Annotated[str | None, typer.Option("--center", help="Only this center.")] = None,
    config: ConfigOption = None,
) -> None:
    """List registers with where their documents stand."""
    with _reported_errors():
        settings = _settings(config)
        infos = asyncio.run(_list_registers(settings, center))
        table = Table("center", "register", "broker user", "contiguous seq", "last seq", "state")
        for info in infos:
            state = "revoked" if info.revoked_at is not None else "active"
            table.add_row(
                info.center_id,
                info.register_id,
                info.broker_user,
                str(info.contiguous_seq),
                str(info.last_seq),
                state,
            )
        _out.print(table)


def main() -> None:
    """Entry point of the ``tillsync-central`` script."""
    app()
