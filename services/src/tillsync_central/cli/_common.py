"""What every group of the ``tillsync-central`` command shares: the ``app``, its consoles
and logger, the ``--config`` option, and the error reporting.

Each command builds the settings once (``--config FILE``, ``TILLSYNC_*`` variables),
configures logging, and runs one coroutine. Errors are printed as code, field and reason
on stderr, with exit status 1 (2 for usage errors, as Typer does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import aio_pika
import asyncpg
import structlog
import typer
from rich.console import Console

from tillsync_protocol import ConfigError, TillsyncError

from ..db import connect, migrate
from ..logs import configure_logging
from ..settings import CentralSettings, load_settings, redact_url

__all__ = [
    "ConfigOption",
    "DatabaseUnavailableError",
    "app",
]

app = typer.Typer(
    name="tillsync-central",
    help="tillsync central: migrations, the central workers, registers and the catalog.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)
# Named for the package, not this module: the name is in every log line (add_logger_name).
_log = structlog.get_logger("tillsync_central.cli")

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
    """Turn a ``TillsyncError`` — or a login refused by PostgreSQL or RabbitMQ, which no
    waiting cures — into a one-line report on stderr and exit status 1."""
    try:
        yield
    except TillsyncError as exc:
        _report(exc)
    except (
        asyncpg.InvalidAuthorizationSpecificationError,  # wrong password, unknown role
        asyncpg.InvalidCatalogNameError,  # no such database
    ) as exc:
        _report(ConfigError(f"PostgreSQL refused the connection: {exc}", field="database_url"))
    except aio_pika.exceptions.ProbableAuthenticationError as exc:
        _report(ConfigError(f"RabbitMQ refused the login: {exc}", field="amqp_url"))


def _report(exc: TillsyncError) -> NoReturn:
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


@app.callback()
def _root() -> None:
    """tillsync central: database migrations and the central workers."""
    # A callback keeps `migrate` a subcommand while it is the only one.
