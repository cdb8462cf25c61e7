"""The relay: every committed catalog change, published in order to ``tillsync.catalog``.

One relay is active at a time (a session advisory lock on its own PostgreSQL
connection); others wait as standbys and take over when its session ends. The active
relay, per scope: reads the changelog rows after ``relay_positions.published_seq`` in
``scope_seq`` order, publishes each as a ``catalog_change`` with key
``cat.<scope>.<entity>`` (persistent, publisher confirms, many in flight), and only when
every one is confirmed stores the new position. It is woken by ``NOTIFY
tillsync_catalog`` at each commit, and polls every ``poll_interval`` seconds in case a
notification was missed (a dropped LISTEN connection, a change written by hand).

A crash between a confirm and the position store publishes those changes again after
the restart, byte for byte: ``msg_id`` is a uuid5 of ``<scope>:<scope_seq>`` and
``created_at`` the change's own time. Registers drop what they already applied. The
relay reconnects to the broker and to PostgreSQL on its own, with capped backoff.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import aio_pika
import asyncpg
import msgpack
import structlog

from tillsync_protocol import CONTENT_TYPE, PROTOCOL_VERSION, Backoff, topology

from .catalog import NOTIFY_CHANNEL
from .confirms import publish_in_order
from .consumer import CLOSE_TIMEOUT_S, connect_amqp, wait_any
from .db import connect
from .settings import CentralSettings

__all__ = ["CHANGE_NAMESPACE", "RELAY_LOCK_KEY", "Relay", "RelayStats", "change_msg_id"]

log = structlog.get_logger(__name__)

RELAY_LOCK_KEY = int.from_bytes(b"ts-relay", "big")
"""The ``pg_try_advisory_lock`` key the active relay holds (the bytes of "ts-relay")."""
CHANGE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "tillsync:catalog_change")
"""Namespace of the uuid5 ``msg_id`` of a published change."""

_TRY_LOCK = "SELECT pg_try_advisory_lock($1)"
# One round trip: the next changes (up to $1) of every scope with unpublished ones, after
# its stored position, in scope_seq order (a scope whose next rows are missing comes as
# one row of nulls, reported as a hole).
_PENDING_CHANGES = """
SELECT p.scope, p.published_seq, c.scope_seq, c.entity, c.key, c.op, c.version, c.state,
       c.changed_at
FROM (
    SELECT s.scope, COALESCE(r.published_seq, 0) AS published_seq
    FROM catalog_scopes s LEFT JOIN relay_positions r USING (scope)
    WHERE s.last_seq > COALESCE(r.published_seq, 0)
) AS p
LEFT JOIN LATERAL (
    SELECT scope_seq, entity, key, op, version, state, changed_at
    FROM catalog_changelog l WHERE l.scope = p.scope AND l.scope_seq > p.published_seq
    ORDER BY l.scope_seq LIMIT $1
) AS c ON true
ORDER BY p.scope, c.scope_seq
"""
_STORE_POSITION = """
INSERT INTO relay_positions AS p (scope, published_seq) VALUES ($1, $2)
ON CONFLICT (scope) DO UPDATE
SET published_seq = GREATEST(p.published_seq, EXCLUDED.published_seq), updated_at = now()
"""


def change_msg_id(scope: str, scope_seq: int) -> str:
    """The ``msg_id`` of a change: the same every time it is published."""
    return str(uuid.uuid5(CHANGE_NAMESPACE, f"{scope}:{scope_seq}"))


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    sessions: int = 0


def _unix_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


_packer = msgpack.Packer(use_bin_type=True)


def _message(scope: str, row: asyncpg.Record) -> tuple[aio_pika.Message, str]:
    """The ``catalog_change`` of a changelog row, packed as ``encode`` packs the model
    (fields in declaration order; a test compares the bytes). Changelog rows were
    validated when written (the catalog editor), so no model is built per change: with
    110,000 imported changes that round trip was most of the relay's time."""
    msg_id = change_msg_id(scope, row["scope_seq"])
    change = {
        "v": list(PROTOCOL_VERSION),
        "type": "catalog_change",
        "created_at": _unix_ms(row["changed_at"]),
        "msg_id": msg_id,
        "body": {
            "scope": scope,
            "scope_seq": row["scope_seq"],
            "entity": row["entity"],
            "key": row["key"],
            "op": row["op"],
            "version": row["version"],
            "state": row["state"],
        },
    }
    message = aio_pika.Message(
        _packer.pack(change),
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=msg_id,
        type="catalog_change",
        app_id="tillsync-central",
    )
    return message, topology.catalog_key(scope, row["entity"])


class Relay:
    """The changelog tailer; ``await relay.run(stopping)`` until ``stopping`` is set."""

    name = "relay"

    def __init__(
        self,
        settings: CentralSettings,
        *,
        batch_size: int = 1000,
        poll_interval: float = 5.0,
        reconnect_base: float = 0.5,
        reconnect_cap: float = 30.0,
    ) -> None:
        self._settings = settings
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._backoff = Backoff(reconnect_base, reconnect_cap)
        self.stats = RelayStats()
        self.active = asyncio.Event()
        """Set while this relay holds the lock and publishes."""

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self._session(stopping)
            except (TimeoutError, Exception) as exc:
                log.warning("relay session ended", error=f"{type(exc).__name__}: {exc}")
            self.active.clear()
            if stopping.is_set():
                break
            await wait_any((stopping,), self._backoff.next())
        log.info("relay stopped", **vars(self.stats))

    async def _session(self, stopping: asyncio.Event) -> None:
        conn = await connect(self._settings)
        try:
            if not await self._acquire(conn, stopping):
                return
            wake = asyncio.Event()
            await conn.add_listener(NOTIFY_CHANNEL, lambda *_: wake.set())
            connection = await connect_amqp(
                self._settings.amqp_url.get_secret_value(), "tillsync-central relay"
            )
            try:
                await self._publish_loop(conn, connection, wake, stopping)
            finally:
                try:
                    await asyncio.wait_for(connection.close(), timeout=CLOSE_TIMEOUT_S)
                except (TimeoutError, Exception):
                    pass  # a dead connection: nothing to close
        finally:
            self.active.clear()
            try:
                await asyncio.wait_for(conn.close(), timeout=CLOSE_TIMEOUT_S)
            except (TimeoutError, Exception):
                conn.terminate()  # the session ends either way, and the lock with it

    async def _acquire(self, conn: asyncpg.Connection, stopping: asyncio.Event) -> bool:
        """Wait until this relay holds the lock (True) or ``stopping`` is set (False)."""
        standby_logged = False
        while not stopping.is_set():
            if await conn.fetchval(_TRY_LOCK, RELAY_LOCK_KEY):
                return True
            if not standby_logged:
                log.info("relay on standby: another relay is active")
                standby_logged = True
            await wait_any((stopping,), self._poll_interval)
        return False

    async def _publish_loop(
        self,
        conn: asyncpg.Connection,
        connection: aio_pika.abc.AbstractConnection,
        wake: asyncio.Event,
        stopping: asyncio.Event,
    ) -> None:
        closed = asyncio.Event()
        connection.close_callbacks.add(lambda *_: closed.set())
        channel = await connection.channel(publisher_confirms=True)
        channel.close_callbacks.add(lambda *_: closed.set())
        exchange = await channel.get_exchange(topology.CATALOG_EXCHANGE, ensure=False)
        self._backoff.reset()
        self.stats.sessions += 1
        self.active.set()
        log.info("relay active")
        while not stopping.is_set():
            if closed.is_set():
                raise ConnectionError("broker connection or channel closed")
            wake.clear()
            if await self._publish_pending(conn, exchange) == 0:
                await wait_any((wake, stopping, closed), self._poll_interval)

    async def _publish_pending(
        self, conn: asyncpg.Connection, exchange: aio_pika.abc.AbstractExchange
    ) -> int:
        """One batch of every scope that has unpublished changes; how many were published."""
        total = 0
        for scope, published, rows in _by_scope(
            await conn.fetch(_PENDING_CHANGES, self._batch_size)
        ):
            rows = _contiguous(rows, published)
            if not rows:
                log.error("changelog hole", scope=scope, after=published)
                continue
            await publish_in_order(exchange, (_message(scope, row) for row in rows))
            last = rows[-1]["scope_seq"]
            await conn.execute(_STORE_POSITION, scope, last)
            total += len(rows)
            self.stats.published += len(rows)
            self.stats.batches += 1
            log.info(
                "changes published",
                scope=scope,
                first_seq=rows[0]["scope_seq"],
                last_seq=last,
                count=len(rows),
            )
        return total


def _by_scope(
    rows: Sequence[asyncpg.Record],
) -> list[tuple[str, int, list[asyncpg.Record]]]:
    """``(scope, published_seq, its rows)`` of :data:`_PENDING_CHANGES`' answer."""
    groups: list[tuple[str, int, list[asyncpg.Record]]] = []
    for row in rows:
        if not groups or groups[-1][0] != row["scope"]:
            groups.append((row["scope"], row["published_seq"], []))
        if row["scope_seq"] is not None:
            groups[-1][2].append(row)
    return groups


def _contiguous(rows: Sequence[asyncpg.Record], published: int) -> list[asyncpg.Record]:
    """The rows that follow ``published`` without a gap (the changelog has none: a gap
    would be a row deleted by hand, and is never skipped silently)."""
    result: list[asyncpg.Record] = []
    expected = published + 1
    for row in rows:
        if row["scope_seq"] != expected:
            break
        result.append(row)
        expected += 1
    return result
