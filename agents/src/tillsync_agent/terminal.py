"""What every ``tillsync-agent`` command shares: the consoles, the ``--config`` option,
loading the settings and printing an error (code, field, reason) before exiting."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from tillsync_protocol import TillsyncError

from .settings import AgentSettings, load_settings

__all__ = ["ConfigOption", "console", "err_console", "fail", "settings_from"]

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="TILLSYNC_CONFIG", help="TOML settings file"),
]


def fail(error: dict[str, Any], exit_code: int = 2) -> NoReturn:
    err_console.print(
        f"[red]error[/red] {error['code']} {error.get('field') or ''}: {error['reason']}"
    )
    raise typer.Exit(exit_code)


def settings_from(config: Path | None) -> AgentSettings:
    try:
        return load_settings(config)
    except TillsyncError as exc:
        fail(exc.to_dict())
