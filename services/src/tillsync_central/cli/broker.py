"""``tillsync-central broker``: central's own broker users."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..settings import CentralSettings
from ._common import ConfigOption, _log, _out, _reported_errors, _settings, app

if TYPE_CHECKING:
    from ..broker_users import ServiceUser


broker_app = typer.Typer(help="Central's own broker users.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")


async def _setup_users(
    settings: CentralSettings,
    user: str,
    password: str | None,
    rotate: bool,
    monitoring_user: str | None,
) -> tuple[ServiceUser, ServiceUser | None]:
    from ..broker_users import setup_monitoring_user, setup_service_user
    from ..management import Management

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
