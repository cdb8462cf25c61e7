"""``tillsync-central api``: the admin API and dashboard alone, without the workers."""

from __future__ import annotations

import asyncio
import signal

import asyncpg
import structlog

from ..db import connect, create_pool, migrate
from ..settings import CentralSettings, redact_url
from .app import AdminServer

__all__ = ["serve_api"]

log = structlog.get_logger(__name__)

POOL_CLOSE_TIMEOUT_S = 10.0


async def serve_api(settings: CentralSettings, stopping: asyncio.Event | None = None) -> None:
    """Migrate, then serve until SIGTERM/SIGINT (or ``stopping``). A port in use raises
    ``ConfigError`` before anything is served."""
    stopping = asyncio.Event() if stopping is None else stopping
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stopping.set)
    try:
        conn = await connect(settings)
        try:
            await migrate(conn, lock_timeout=settings.migration_lock_timeout)
        finally:
            await conn.close()
        pool = await create_pool(settings)
        try:
            server = AdminServer(settings, pool)
            server.start()
            log.info(
                "admin api starting", url=server.url, database=redact_url(settings.database_url)
            )
            await server.serve(stopping)
        finally:
            try:
                await asyncio.wait_for(pool.close(), timeout=POOL_CLOSE_TIMEOUT_S)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
