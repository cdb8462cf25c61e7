"""Central's pool (real PostgreSQL): a connection goes back to the pool without asyncpg's
reset query, which is sound only while no code leaves session state on a pooled
connection; both halves are checked here."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg

from tillsync_central.db import create_pool
from tillsync_central.settings import CentralSettings

SOURCE = Path(__file__).resolve().parents[2] / "services" / "src" / "tillsync_central"
OWN_CONNECTIONS = {"relay.py", "db/migrate.py"}
"""Modules whose session state lives on a connection of their own (``db.connect``)."""

SESSION_STATE = re.compile(
    r"""pg_(try_)?advisory_lock\(      # a session lock (the _xact_ ones end with the transaction)
      | \bLISTEN\s | add_listener\(
      | ["']\s*(BEGIN;\s*)?SET\s+(?!LOCAL\b|TRANSACTION\b)   # a statement SET without LOCAL
      | set_config\([^)]*false         # set_config(..., is_local => false)
      | \bDECLARE\s+\w+\s+CURSOR\s+WITH\s+HOLD
      | \bPREPARE\s+\w+\s+AS
    """,
    re.VERBOSE,  # SQL keywords are upper case in this code base
)


def test_no_session_state_is_left_on_pooled_connections() -> None:
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        name = path.relative_to(SOURCE).as_posix()
        if name in OWN_CONNECTIONS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SESSION_STATE.search(line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert offenders == [], (
        "session state on a pooled connection: the pool no longer resets it on release "
        "(db/pool.py); use SET LOCAL, pg_try_advisory_xact_lock, or db.connect()"
    )
    # The guard itself sees what it guards against.
    assert SESSION_STATE.search('await conn.execute("SET statement_timeout = 0")')
    assert SESSION_STATE.search("SELECT pg_advisory_lock($1)")
    assert not SESSION_STATE.search('"BEGIN; SET LOCAL synchronous_commit TO OFF"')
    assert not SESSION_STATE.search("UPDATE registers SET revoked_at = now()")


async def _queries_on_release(pool: asyncpg.Pool) -> list[str]:
    """What the pool sends when a connection that ran a transaction is released."""
    sent: list[str] = []
    conn = await pool.acquire()
    async with conn.transaction():
        await conn.execute("SET LOCAL work_mem = '7MB'")
    await asyncio.sleep(0.05)  # asyncpg calls query loggers soon after, not at once
    conn.add_query_logger(lambda record: sent.append(record.query))
    await pool.release(conn)
    await asyncio.sleep(0.05)
    return sent


async def test_release_sends_nothing_and_rolls_back_an_open_transaction(
    settings: CentralSettings,
) -> None:
    dsn = settings.database_url.get_secret_value()
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as plain:
        # The control: asyncpg's own pool resets every connection it gets back.
        assert any("RESET ALL" in q for q in await _queries_on_release(plain))

    settings = settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 1})
    pool = await create_pool(settings)
    try:
        assert await _queries_on_release(pool) == []  # one round trip less per use
        await pool.execute("CREATE TABLE pool_probe (n int)")
        await pool.execute("INSERT INTO pool_probe VALUES (1)")
        conn = await pool.acquire()  # the same connection (the pool holds one)
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO pool_probe VALUES (2)")
        await pool.release(conn)  # left open: asyncpg still rolls it back
        async with pool.acquire() as again:
            assert await again.fetchval("SELECT current_setting('work_mem')") != "7MB"
            assert await again.fetchval("SELECT array_agg(n) FROM pool_probe") == [1]
            assert not again.is_in_transaction()
    finally:
        await pool.execute("DROP TABLE IF EXISTS pool_probe")
        await pool.close()
