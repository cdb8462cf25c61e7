"""``tillsync-central registers``: enroll, list and revoke registers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Column, Table

from tillsync_protocol import TillsyncError

from ..db import create_pool
from ..provisioning import Enrollment, RegisterInfo, RegisterTls, Revocation
from ..settings import CentralSettings
from ._common import ConfigOption, _log, _out, _reported_errors, _settings, app

if TYPE_CHECKING:
    from ..presence import PresenceInfo


registers_app = typer.Typer(help="Enroll, list and revoke registers.", no_args_is_help=True)
app.add_typer(registers_app, name="registers")


async def _add_register(
    settings: CentralSettings, center: str, register: str, password: str | None
) -> Enrollment:
    from ..management import Management
    from ..provisioning import add_register
    from ..runner import declare

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
    from ..management import Management
    from ..provisioning import revoke_register

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
    from ..presence import fleet_presence
    from ..provisioning import list_registers

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
