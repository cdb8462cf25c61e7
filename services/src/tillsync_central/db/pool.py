"""PostgreSQL connections of a central process: one pool, built from the settings.

Every connection decodes ``json`` and ``jsonb`` columns to Python objects and encodes
Python objects given for them, so no caller formats JSON by hand.

A pooled connection carries no session state from one user to the next, by rule: settings
are ``SET LOCAL``, advisory locks are transaction-scoped (``pg_try_advisory_xact_lock``),
cursors live inside transactions, and what needs a session of its own (the relay's
``LISTEN`` and session lock, migrations, ingest's ``register_state`` writer) opens its
own connection (:func:`connect`). So releasing a connection to the pool does not send
asyncpg's reset query (``pg_advisory_unlock_all``, ``CLOSE ALL``, ``UNLISTEN *``,
``RESET ALL``): one round trip less for every use, which an ingest batch of one
document pays on its way to the register's ack. asyncpg still rolls back a transaction
left open. ``tests/central/test_pool.py`` holds the rule.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from ..settings import CentralSettings

__all__ = ["connect", "create_pool", "init_connection"]


def _encode_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def init_connection(conn: asyncpg.Connection) -> None:
    """Prepare a new connection: JSON codecs for ``json`` and ``jsonb``."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            schema="pg_catalog",
            encoder=_encode_json,
            decoder=json.loads,
            format="text",
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to reset (see the module's docstring)."""


async def create_pool(settings: CentralSettings) -> asyncpg.Pool:
    """Open the pool; the caller closes it (``async with await create_pool(s) as pool``).

    Each connection attempt gives up after ``db_connect_timeout`` seconds, and each
    statement after ``db_command_timeout`` unless the call passes its own timeout.
    """
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        timeout=settings.db_connect_timeout,
        command_timeout=settings.db_command_timeout,
        init=init_connection,
        reset=_keep_session,
    )
    assert pool is not None  # asyncpg types the result as optional
    return pool


async def connect(
    settings: CentralSettings, *, server_settings: dict[str, str] | None = None
) -> asyncpg.Connection:
    """One connection outside the pool (migrations, CLI commands, ingest's
    ``register_state`` writer); the caller closes it. ``server_settings`` are the
    session's PostgreSQL settings (for example ``synchronous_commit``)."""
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=settings.db_connect_timeout,
        command_timeout=settings.db_command_timeout,
        server_settings=server_settings,
    )
    await init_connection(conn)
    return conn
