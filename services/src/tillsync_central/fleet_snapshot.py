"""The fleet as ``/metrics`` shows it: a few aggregate queries over central's tables, read
in one read-only snapshot within a hard timeout (:func:`read_fleet`).

A register is *online* while its last heartbeat is younger than three heartbeat intervals,
as :func:`tillsync_central.presence.fleet_presence` and ``registers list`` say; pending and
rejected are the counts each register reported in its latest heartbeat. The relay's lag is
the changelog head against its stored position, per scope.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg

from .settings import CentralSettings

__all__ = ["DB_TIMEOUT_S", "REGISTER_STATES", "FleetSnapshot", "offline_after_s", "read_fleet"]

REGISTER_STATES = ("online", "offline", "never_seen", "revoked")
"""The ``state`` label of ``tillsync_registers`` (as ``registers list`` shows them)."""

DB_TIMEOUT_S = 2.0

# One row per (center, state): a register is online while its last heartbeat is younger
# than $1 seconds, as presence.fleet_presence says. Pending and rejected are the counts
# each register reported in its latest heartbeat.
_REGISTERS = """
SELECT r.center_id,
       CASE WHEN r.revoked_at IS NOT NULL THEN 'revoked'
            WHEN p.last_seen IS NULL THEN 'never_seen'
            WHEN p.last_seen >= now() - make_interval(secs => $1) THEN 'online'
            ELSE 'offline' END AS state,
       count(*) AS registers,
       COALESCE(sum(p.pending), 0)::bigint AS pending,
       COALESCE(sum(p.rejected), 0)::bigint AS rejected
FROM registers r LEFT JOIN register_presence p USING (register_id)
GROUP BY 1, 2
"""
# The changelog head against the relay's stored position, per scope; the age of the first
# unpublished change is one primary-key lookup per scope.
_RELAY = """
SELECT s.scope, s.last_seq - COALESCE(p.published_seq, 0) AS behind,
       COALESCE(extract(epoch FROM now() - c.changed_at), 0)::float8 AS behind_s
FROM catalog_scopes s
LEFT JOIN relay_positions p USING (scope)
LEFT JOIN catalog_changelog c
       ON c.scope = s.scope AND c.scope_seq = COALESCE(p.published_seq, 0) + 1
"""
_DEAD_LETTERS = """
SELECT source, code, status, count(*) AS letters FROM dead_letters GROUP BY 1, 2, 3
"""
_CONFLICTS = """
SELECT kind, resolved_at IS NOT NULL AS resolved, count(*) AS conflicts
FROM conflicts GROUP BY 1, 2
"""
_CATALOG_CONFLICTS = "SELECT code, count(*) AS conflicts FROM catalog_conflicts GROUP BY 1"
_HOLES = "SELECT count(*) AS n FROM register_state WHERE last_seq > contiguous_seq"


def offline_after_s(settings: CentralSettings) -> float:
    """The presence window: offline after three missed heartbeats (as ``registers list``)."""
    return 3 * settings.heartbeat_interval_s


@dataclass(frozen=True)
class FleetSnapshot:
    """What the database said at one scrape."""

    registers: dict[tuple[str, str], int] = field(default_factory=dict)
    """(center, state) → registers."""
    pending: dict[tuple[str, str], int] = field(default_factory=dict)
    """(center, state) → documents pending at the registers' latest heartbeats."""
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)
    relay_lag: dict[str, int] = field(default_factory=dict)
    """scope → changes committed but not yet published by the relay."""
    relay_lag_seconds: dict[str, float] = field(default_factory=dict)
    dead_letters: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(source, code, status) → stored dead letters."""
    conflicts: dict[tuple[str, str], int] = field(default_factory=dict)
    """(kind, resolved|unresolved) → stored conflicts."""
    catalog_conflicts: dict[str, int] = field(default_factory=dict)
    registers_with_holes: int = 0


async def read_fleet(
    pool: asyncpg.Pool, offline_after: float, *, timeout: float = DB_TIMEOUT_S
) -> FleetSnapshot:
    """Run the scrape-time queries in one read-only snapshot; raises ``TimeoutError``
    after ``timeout`` seconds, or the database's error."""
    conn: asyncpg.pool.PoolConnectionProxy | None = None
    try:
        async with asyncio.timeout(timeout):
            conn = await pool.acquire()
            rows = await _read(conn, offline_after)
    except BaseException:
        # The connection may be mid-query on a silent link: a rollback or a reset would
        # wait for it well past the timeout. Drop it; the pool opens another.
        if conn is not None:
            conn.terminate()
        raise
    finally:
        if conn is not None:
            await pool.release(conn)
    return _snapshot(*rows)


async def _read(
    conn: asyncpg.pool.PoolConnectionProxy, offline_after: float
) -> tuple[list[asyncpg.Record], ...]:
    # Not conn.transaction(): its rollback on a timeout would wait on a dead link.
    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    result = (
        await conn.fetch(_REGISTERS, float(offline_after)),
        await conn.fetch(_RELAY),
        await conn.fetch(_DEAD_LETTERS),
        await conn.fetch(_CONFLICTS),
        await conn.fetch(_CATALOG_CONFLICTS),
        await conn.fetch(_HOLES),
    )
    await conn.execute("COMMIT")
    return result


def _snapshot(
    register_rows: list[asyncpg.Record],
    relay_rows: list[asyncpg.Record],
    letter_rows: list[asyncpg.Record],
    conflict_rows: list[asyncpg.Record],
    catalog_rows: list[asyncpg.Record],
    hole_rows: list[asyncpg.Record],
) -> FleetSnapshot:
    snapshot = FleetSnapshot(registers_with_holes=int(hole_rows[0][0]))
    for center in {row["center_id"] for row in register_rows}:
        for state in REGISTER_STATES:  # zeros too: an absent series cannot be graphed
            for values in (snapshot.registers, snapshot.pending, snapshot.rejected):
                values[center, state] = 0
    for row in register_rows:
        key = (row["center_id"], row["state"])
        snapshot.registers[key] = int(row["registers"])
        snapshot.pending[key] = int(row["pending"])
        snapshot.rejected[key] = int(row["rejected"])
    for row in relay_rows:
        snapshot.relay_lag[row["scope"]] = int(row["behind"])
        snapshot.relay_lag_seconds[row["scope"]] = max(0.0, float(row["behind_s"]))
    for row in letter_rows:
        snapshot.dead_letters[row["source"], row["code"], row["status"]] = int(row["letters"])
    for row in conflict_rows:
        resolution = "resolved" if row["resolved"] else "unresolved"
        snapshot.conflicts[row["kind"], resolution] = int(row["conflicts"])
    for row in catalog_rows:
        snapshot.catalog_conflicts[row["code"]] = int(row["conflicts"])
    return snapshot
