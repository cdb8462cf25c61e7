"""PostgreSQL connections of a central process: one pool, built from the settings.

Every connection decodes ``json`` and ``jsonb`` columns to Python objects and encodes
Python objects given for them, so no caller formats JSON by hand.
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
