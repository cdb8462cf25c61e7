"""``tillsync-central users``: operators of the admin API and dashboard."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Column, Table

from tillsync_protocol import TillsyncError

from ..db import create_pool
from ..settings import CentralSettings
from ._common import ConfigOption, _log, _migrate, _out, _reported_errors, _settings, app

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
    from ..admin import add_operator

    await _migrate(settings)
    pool = await create_pool(settings)
    try:
        operator = await add_operator(pool, username, role, password)
        from ..admin.audit import record

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
    from ..admin import list_operators

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
