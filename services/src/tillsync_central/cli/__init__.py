"""The ``tillsync-central`` command: one module per command group.

``_common`` holds the ``app`` and what the groups share (settings, consoles, error
reports); importing a group module registers its commands on it.
"""

from __future__ import annotations

# Importing a group module registers its commands on `app`.
from . import broker, catalog, migrations, registers, service, users  # noqa: F401
from ._common import DatabaseUnavailableError as DatabaseUnavailableError
from ._common import app

__all__ = ["app", "main"]

# Typer lists commands in the order they were registered, and the modules above register
# theirs as they are imported: keep `--help` in the order operators know.
_COMMAND_ORDER = ("migrate", "run", "reinit", "api")
_GROUP_ORDER = ("broker", "registers", "catalog", "users")


def _position(name: str | None, order: tuple[str, ...]) -> int:
    return order.index(name) if name in order else len(order)


app.registered_commands.sort(key=lambda info: _position(info.name, _COMMAND_ORDER))
app.registered_groups.sort(key=lambda info: _position(info.name, _GROUP_ORDER))


def main() -> None:
    """Entry point of the ``tillsync-central`` script."""
    app()
