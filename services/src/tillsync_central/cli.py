"""The ``tillsync-central`` command.

Each command builds the settings once (``--config FILE``, ``TILLSYNC_*`` variables),
configures logging, and runs one coroutine. Errors are printed as code, field and reason
on stderr, with exit status 1 (2 for usage errors, as Typer does).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import aio_pika
import asyncpg
import structlog
import typer
from rich.console import Console
from rich.table import Column, Table

from tillsync_protocol import ConfigError, TillsyncError

from .db import (
    MigrationError,
    MigrationStatus,
    connect,
    create_pool,
    migrate,
    migration_status,
)
from .logs import configure_logging
from .provisioning import Enrollment, RegisterInfo, RegisterTls, Revocation
from .settings import CentralSettings, load_settings, redact_url

if TYPE_CHECKING:
    from .broker_users import ServiceUser
    from .catalog import Change
    from .catalog_import import ImportReport
    from .commands import ReinitOrder
    from .presence import PresenceInfo

__all__ = ["app", "main"]

app = typer.Typer(
    name="tillsync-central",
    help="tillsync central: migrations, the central workers, registers and the catalog.",
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
    rpc_workers: Annotated[
        int,
        typer.Option("--rpc-workers", min=1, max=64, help="Catalog RPC consumers in this process."),
    ] = 1,
) -> None:
    """Migrate, declare the topology, then ingest documents, relay catalog changes and
    answer delta requests until SIGTERM or SIGINT."""
    from .runner import run
    from .systemd import Notifier

    with _reported_errors():
        settings = _settings(config)
        # Under systemd (Type=notify): READY=1, watchdog pings, STOPPING=1; else no-ops.
        notifier = Notifier.from_environment(os.environ, os.getpid())
        asyncio.run(run(settings, workers=workers, rpc_workers=rpc_workers, notifier=notifier))


broker_app = typer.Typer(help="Central's own broker users.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")


async def _setup_users(
    settings: CentralSettings,
    user: str,
    password: str | None,
    rotate: bool,
    monitoring_user: str | None,
) -> tuple[ServiceUser, ServiceUser | None]:
    from .broker_users import setup_monitoring_user, setup_service_user
    from .management import Management

    async with Management.from_settings(settings) as management:
        service = await setup_service_user(
            management,
            settings.amqp_url.get_secret_value(),
            user=user,
            password=password,
            rotate=rotate,
        )
        if monitoring_user is None:
            return service, None
        monitor = await setup_monitoring_user(
            management,
            settings.rabbitmq_api_url.get_secret_value(),
            user=monitoring_user,
            rotate=rotate,
        )
        return service, monitor


def _report_user(result: ServiceUser, setting: str, url_file: Path | None) -> None:
    what = "created" if result.created else "updated"
    if result.amqp_url is None:
        _out.print(f"{what} broker user {result.user}: permissions applied, password kept")
    elif url_file is not None:
        url_file.touch(mode=0o600, exist_ok=True)
        url_file.chmod(0o600)
        url_file.write_text(result.amqp_url + "\n", encoding="utf-8")
        _out.print(f"{what} broker user {result.user}; its {setting} written to {url_file}")
    else:
        _out.print(f"{what} broker user {result.user}")
        _out.print(f"{setting} = {result.amqp_url}", highlight=False, markup=False)


@broker_app.command("setup-users")
def broker_setup_users(
    user: Annotated[
        str, typer.Option("--user", help="The service user's name.")
    ] = "tillsync-central",
    password: Annotated[
        str | None,
        typer.Option("--password", help="Set this password (default: keep, or random if new)."),
    ] = None,
    rotate: Annotated[
        bool, typer.Option("--rotate", help="Give an existing user a new random password.")
    ] = False,
    url_file: Annotated[
        Path | None,
        typer.Option(
            "--url-file",
            help="Write the service user's amqp_url here (mode 0600) instead of printing it.",
            dir_okay=False,
        ),
    ] = None,
    monitoring_user: Annotated[
        str,
        typer.Option(
            "--monitoring-user", help="The read-only management user's name (the dashboard's)."
        ),
    ] = "tillsync-monitor",
    monitoring: Annotated[
        bool,
        typer.Option(
            "--monitoring/--no-monitoring", help="Also set up the read-only management user."
        ),
    ] = True,
    api_url_file: Annotated[
        Path | None,
        typer.Option(
            "--api-url-file",
            help="Write the monitoring user's rabbitmq_api_url here (mode 0600).",
            dir_okay=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create or update central's least-privilege broker user on amqp_url's vhost, and the
    read-only management user the dashboard reads queues with (through the management API,
    with rabbitmq_api_url's administrator); idempotent. Point the workers' amqp_url at the
    first, and the dashboard-only hosts' rabbitmq_api_url at the second."""
    with _reported_errors():
        settings = _settings(config)
        service, monitor = asyncio.run(
            _setup_users(settings, user, password, rotate, monitoring_user if monitoring else None)
        )
        _log.info("service user set up", user=service.user, created=service.created)
        _report_user(service, "amqp_url", url_file)
        if monitor is not None:
            _log.info("monitoring user set up", user=monitor.user, created=monitor.created)
            _report_user(monitor, "rabbitmq_api_url", api_url_file)


registers_app = typer.Typer(help="Enroll, list and revoke registers.", no_args_is_help=True)
app.add_typer(registers_app, name="registers")


async def _add_register(
    settings: CentralSettings, center: str, register: str, password: str | None
) -> Enrollment:
    from .management import Management
    from .provisioning import add_register
    from .runner import declare

    tls = _register_tls(settings)
    await declare(settings)
    pool = await create_pool(settings)
    try:
        async with Management.from_settings(settings) as management:
            return await add_register(
                pool,
                management,
                settings.register_broker_url or settings.amqp_url.get_secret_value(),
                center,
                register,
                password,
                tls=tls,
            )
    finally:
        await pool.close()


def _register_tls(settings: CentralSettings) -> RegisterTls:
    """What the settings give registers for TLS (the broker's CA is read here, once)."""
    from tillsync_protocol import ConfigError

    broker_ca_pem = None
    if settings.register_broker_ca_file is not None:
        try:
            broker_ca_pem = settings.register_broker_ca_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read {settings.register_broker_ca_file}: {exc}",
                field="register_broker_ca_file",
            ) from None
    return RegisterTls(
        broker_ca_pem=broker_ca_pem,
        client_ca_cert_file=settings.register_client_ca_cert_file,
        client_ca_key_file=settings.register_client_ca_key_file,
        client_cert_days=settings.register_client_cert_days,
    )


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
        if bundle is None and settings.register_client_ca_cert_file is not None:
            raise TillsyncError(
                "a register's client certificate key only leaves central in its bundle",
                field="bundle",
                code="invalid_value",
            )
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


async def _list_registers(
    settings: CentralSettings, center: str | None
) -> tuple[list[RegisterInfo], dict[str, PresenceInfo]]:
    from .presence import fleet_presence
    from .provisioning import list_registers

    pool = await create_pool(settings)
    try:
        infos = await list_registers(pool, center)
        presence = await fleet_presence(pool, 3 * settings.heartbeat_interval_s, center)
    finally:
        await pool.close()
    return infos, {p.register_id: p for p in presence}


def _last_sync(presence: PresenceInfo | None) -> str:
    last = None if presence is None else presence.last_sync
    if not last:
        return "-"
    return f"{last.get('kind')} {last.get('result')}"


@registers_app.command("list")
def registers_list(
    center: Annotated[str | None, typer.Option("--center", help="Only this center.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per register.")] = False,
    config: ConfigOption = None,
) -> None:
    """List registers: where their documents stand, and their presence (online when the
    last heartbeat is younger than 3 x heartbeat_interval_s), pending and last sync."""
    with _reported_errors():
        settings = _settings(config)
        infos, presence = asyncio.run(_list_registers(settings, center))
        if as_json:
            for info in infos:
                seen = presence.get(info.register_id)
                row = {
                    **{k: v for k, v in vars(info).items() if k != "created_at"},
                    "revoked_at": None if info.revoked_at is None else info.revoked_at.isoformat(),
                    "last_received_at": None
                    if info.last_received_at is None
                    else info.last_received_at.isoformat(),
                    "presence": "never seen" if seen is None else seen.state,
                    "last_seen": None
                    if seen is None or seen.last_seen is None
                    else seen.last_seen.isoformat(),
                    "pending": None if seen is None else seen.pending,
                    "agent_version": None if seen is None else seen.agent_version,
                    "last_sync": None if seen is None else seen.last_sync,
                    "last_error": None if seen is None else seen.last_error,
                }
                _out.print(json.dumps(row), highlight=False, markup=False, soft_wrap=True)
            return
        # Ids are what people grep for: never wrapped; the other columns give way.
        table = Table(
            Column("center", no_wrap=True),
            Column("register", no_wrap=True),
            "state",
            "presence",
            "pending",
            "acked up to",
            "last seq",
            "last sync",
        )
        for info in infos:
            seen = presence.get(info.register_id)
            state = "revoked" if info.revoked_at is not None else "active"
            pending = None if seen is None else seen.pending
            table.add_row(
                info.center_id,
                info.register_id,
                state,
                "never seen" if seen is None else seen.state,
                "-" if pending is None else str(pending),
                str(info.contiguous_seq),
                str(info.last_seq),
                _last_sync(seen),
            )
        _out.print(table)


catalog_app = typer.Typer(
    help="Edit the catalog: import files, set or delete rows.", no_args_is_help=True
)
app.add_typer(catalog_app, name="catalog")

ScopeOption = Annotated[str, typer.Option("--scope", "-s", help="'global' or a center id.")]
MAX_ERRORS_SHOWN = 50


async def _import(
    settings: CentralSettings,
    file: Path,
    scope: str,
    entity: str | None,
    file_format: str | None,
    batch_size: int,
) -> ImportReport:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from .catalog_import import count_lines, detect_format, import_file

    fmt = detect_format(file) if file_format is None else file_format
    total = max(count_lines(file) - (1 if fmt == "csv" else 0), 0)
    pool = await create_pool(settings)
    try:
        with Progress(
            TextColumn("[bold]importing[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_err,
        ) as progress:
            task = progress.add_task(file.name, total=total)
            return await import_file(
                pool,
                file,
                scope=scope,
                entity=entity,
                file_format=fmt,  # type: ignore[arg-type]
                batch_size=batch_size,
                on_progress=lambda rows: progress.update(task, completed=rows),
            )
    finally:
        await pool.close()


@catalog_app.command("import")
def catalog_import(
    file: Annotated[Path, typer.Argument(help="CSV with a header, or JSON lines.", dir_okay=False)],
    scope: ScopeOption = "global",
    entity: Annotated[
        str | None,
        typer.Option(
            "--entity", "-e", help="The entity of every row (CSV without an 'entity' column)."
        ),
    ] = None,
    file_format: Annotated[
        str | None,
        typer.Option("--format", help="csv or jsonl (default: from the file's suffix)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=10_000, help="Rows per transaction.")
    ] = 1000,
    config: ConfigOption = None,
) -> None:
    """Import catalog rows; bad rows are reported (line, code, field, reason) and the good
    ones applied. Exit status 1 if any row was bad."""
    with _reported_errors():
        settings = _settings(config)
        if file_format not in (None, "csv", "jsonl"):
            raise TillsyncError("--format is csv or jsonl", field="format", code="invalid_value")
        report = asyncio.run(_import(settings, file, scope, entity, file_format, batch_size))
        _log.info(
            "catalog imported",
            file=str(file),
            rows=report.rows,
            changes=report.changes,
            unchanged=report.unchanged,
            bad=len(report.errors),
            seconds=round(report.seconds, 2),
        )
        if report.errors:
            table = Table("line", "code", "field", "reason", title="rows not imported")
            for error in report.errors[:MAX_ERRORS_SHOWN]:
                table.add_row(str(error.line), error.code, error.field or "-", error.reason)
            _err.print(table)
            if len(report.errors) > MAX_ERRORS_SHOWN:
                _err.print(f"... and {len(report.errors) - MAX_ERRORS_SHOWN} more bad rows")
        good = report.rows - len(report.errors)
        _out.print(
            f"{report.rows} rows read: {good} good ({report.changes} changed, "
            f"{report.unchanged} unchanged), {len(report.errors)} bad, "
            f"in {report.seconds:.1f} s"
        )
        if report.errors:
            raise typer.Exit(1)


async def _edit(
    settings: CentralSettings, scope: str, entity: str, key: str, state: object | None
) -> Change | None:
    from .catalog import CatalogEditor

    pool = await create_pool(settings)
    try:
        editor = CatalogEditor(pool, changed_by="tillsync-central cli")
        if state is None:
            return await editor.delete(scope, entity, key)
        return await editor.upsert(scope, entity, key, state)
    finally:
        await pool.close()


def _print_change(change: Change) -> None:
    _out.print(
        f"{change.op} {change.entity} {change.key} in {change.scope}: "
        f"scope_seq {change.scope_seq}, version {change.version}",
        highlight=False,
    )


@catalog_app.command("set")
def catalog_set(
    entity: Annotated[str, typer.Argument(help="The entity (items, prices, …).")],
    key: Annotated[str, typer.Argument(help="The row's key.")],
    state: Annotated[str, typer.Argument(help="The whole state as JSON: '{\"name\": …}'.")],
    scope: ScopeOption = "global",
    config: ConfigOption = None,
) -> None:
    """Create or replace one catalog row."""
    with _reported_errors():
        settings = _settings(config)
        try:
            parsed = json.loads(state)
        except json.JSONDecodeError as exc:
            raise TillsyncError(f"not JSON: {exc.msg}", field="state", code="malformed") from None
        change = asyncio.run(_edit(settings, scope, entity, key, parsed))
        assert change is not None
        _print_change(change)


@catalog_app.command("delete")
def catalog_delete(
    entity: Annotated[str, typer.Argument(help="The entity (items, prices, …).")],
    key: Annotated[str, typer.Argument(help="The row's key.")],
    scope: ScopeOption = "global",
    config: ConfigOption = None,
) -> None:
    """Delete one catalog row (registers are told to delete it too)."""
    with _reported_errors():
        settings = _settings(config)
        change = asyncio.run(_edit(settings, scope, entity, key, None))
        if change is None:
            _out.print(f"nothing to delete: no live {entity} {key} in {scope}", highlight=False)
        else:
            _print_change(change)


async def _reinit(
    settings: CentralSettings,
    register: str | None,
    center: str | None,
    order: ReinitOrder,
) -> list[str]:
    from .commands import registers_for, send_reinit

    pool = await create_pool(settings)
    try:
        targets = await registers_for(pool, register_id=register, center_id=center)
    finally:
        await pool.close()
    if targets:
        await send_reinit(settings, targets, order)
    return targets


@app.command("reinit")
def reinit_command(
    mode: Annotated[
        str, typer.Option("--mode", help="update (upsert everything) or replace (swap).")
    ],
    register: Annotated[str | None, typer.Option("--register", help="One register.")] = None,
    center: Annotated[
        str | None, typer.Option("--center", help="Every active register of a center.")
    ] = None,
    with_customers: Annotated[
        bool,
        typer.Option("--with-customers/--without-customers", help="Include customers."),
    ] = True,
    entities: Annotated[
        str | None, typer.Option("--entities", help="Comma-separated entities (default: all).")
    ] = None,
    requested_by: Annotated[
        str, typer.Option("--requested-by", help="Who asks (shown on the register).")
    ] = "tillsync-central",
    config: ConfigOption = None,
) -> None:
    """Tell registers to reload their catalog (a `reinit` command in their queue)."""
    from .commands import ReinitOrder

    with _reported_errors():
        settings = _settings(config)
        if (register is None) == (center is None):
            raise TillsyncError(
                "name exactly one of --register and --center",
                field="register",
                code="invalid_value",
            )
        if mode not in ("update", "replace"):
            raise TillsyncError("--mode is update or replace", field="mode", code="invalid_value")
        order = ReinitOrder(
            mode="update" if mode == "update" else "replace",
            with_customers=with_customers,
            entities=None
            if entities is None
            else [e.strip() for e in entities.split(",") if e.strip()],
            requested_by=requested_by,
        )
        targets = asyncio.run(_reinit(settings, register, center, order))
        _log.info("reinit sent", registers=targets, mode=mode, with_customers=with_customers)
        if not targets:
            _out.print(f"no active register in center {center}", highlight=False)
        for target in targets:
            _out.print(f"reinit ({mode}) sent to {target}", highlight=False)


users_app = typer.Typer(help="Operators of the admin API and dashboard.", no_args_is_help=True)
app.add_typer(users_app, name="users")


def _read_password(password_file: Path | None) -> str:
    """From ``--password-file``, else ``TILLSYNC_OPERATOR_PASSWORD``, else a prompt."""
    if password_file is not None:
        try:
            return password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise TillsyncError(
                f"cannot read {password_file}: {exc.strerror}",
                field="password_file",
                code="invalid_value",
            ) from None
    from_env = os.environ.get("TILLSYNC_OPERATOR_PASSWORD")
    if from_env:
        return from_env
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


async def _add_user(settings: CentralSettings, username: str, role: str, password: str) -> str:
    from .admin import add_operator

    await _migrate(settings)
    pool = await create_pool(settings)
    try:
        operator = await add_operator(pool, username, role, password)
        from .admin.audit import record

        await record(pool, "tillsync-central cli", "operator.add", username, {"role": role})
    finally:
        await pool.close()
    return operator.role


@users_app.command("add")
def users_add(
    username: Annotated[str, typer.Argument(help="The operator's login name.")],
    role: Annotated[
        str, typer.Option("--role", help="administrator, supervisor or viewer.")
    ] = "viewer",
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file",
            help="Read the password from this file (else $TILLSYNC_OPERATOR_PASSWORD, "
            "else a prompt).",
            dir_okay=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Add an operator (the first administrator is made this way)."""
    with _reported_errors():
        settings = _settings(config)
        password = _read_password(password_file)
        created_role = asyncio.run(_add_user(settings, username, role, password))
        _log.info("operator added", username=username, role=created_role)
        _out.print(f"added {username} ({created_role})", highlight=False)


async def _list_users(settings: CentralSettings) -> list[dict[str, str | None]]:
    from .admin import list_operators

    pool = await create_pool(settings)
    try:
        return [operator.to_dict() for operator in await list_operators(pool)]
    finally:
        await pool.close()


@users_app.command("list")
def users_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per operator.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the operators and their roles."""
    with _reported_errors():
        settings = _settings(config)
        operators = asyncio.run(_list_users(settings))
        if as_json:
            for operator in operators:
                _out.print(json.dumps(operator), highlight=False, markup=False, soft_wrap=True)
            return
        table = Table(Column("username", no_wrap=True), "role", "created at", "disabled at")
        for operator in operators:
            table.add_row(
                operator["username"],
                operator["role"],
                operator["created_at"],
                operator["disabled_at"] or "",
            )
        _out.print(table)


@app.command("api")
def api_command(
    config: ConfigOption = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Listen here (default: admin_host).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="Listen here (default: admin_port)."),
    ] = None,
) -> None:
    """Serve the admin API and dashboard alone (no workers) until SIGTERM or SIGINT."""
    from .admin.serve import serve_api

    with _reported_errors():
        settings = _settings(config)
        overrides = {k: v for k, v in (("admin_host", host), ("admin_port", port)) if v is not None}
        if overrides:
            settings = settings.model_copy(update=overrides)
        asyncio.run(serve_api(settings))


def main() -> None:
    """Entry point of the ``tillsync-central`` script."""
    app()
