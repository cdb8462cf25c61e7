"""Presence: registers' heartbeats from ``tillsync.presence`` into ``register_presence``.

The presence worker (:class:`PresenceWorker`, any number competing on the queue) checks
every heartbeat as ingest checks a document — the broker vouches for ``user_id`` only when
it is set, so central checks the rest:

1. ``user_id`` is set: else ``missing_user_id``;
2. the routing key is ``hb.<center>.<register>``: else ``invalid_routing_key``;
3. the bytes are a valid v1 ``heartbeat``: else the protocol error's code (another
   control message is ``unknown_type``);
4. ``user_id`` is ``reg-<body.register_id>`` and the key's center and register are the
   body's: else ``identity_mismatch``;
5. the register is enrolled, not revoked, and in the body's center: else
   ``unknown_register``.

A refused heartbeat becomes a dead letter (``source='presence'``) with its raw bytes; an
accepted one overwrites its register's row, with ``last_seen`` set by central's clock.
A batch keeps only each register's latest heartbeat and is written in one transaction.

:func:`fleet_presence` reads the fleet view: a register is *online* when its last
heartbeat is younger than ``offline_after_s`` (by default three heartbeat intervals).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage

from tillsync_protocol import (
    Backoff,
    Heartbeat,
    ProtocolError,
    RejectedError,
    TillsyncError,
    decode_control,
    to_json,
    topology,
)

from .consumer import BatchConsumer, Session
from .dead_letters import DeadLetter, insert_dead_letters
from .ingest import delivery_of
from .intake import Delivery
from .settings import CentralSettings
from .store import is_transient

__all__ = [
    "PresenceInfo",
    "PresenceStats",
    "PresenceWorker",
    "check_heartbeat",
    "fleet_presence",
]

log = structlog.get_logger(__name__)

DB_RETRY_BASE_S = 0.2
DB_RETRY_CAP_S = 10.0

_UPSERT = """
INSERT INTO register_presence (register_id, last_seen, sent_at, agent_version, pending,
                               rejected, acknowledged, last_seq, cursors, last_sync,
                               last_error, heartbeat)
SELECT u.register_id, now(), to_timestamp(u.sent_at / 1000.0), u.agent_version, u.pending,
       u.rejected, u.acknowledged, u.last_seq, u.cursors::jsonb, u.last_sync::jsonb,
       u.last_error, u.heartbeat::jsonb
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[],
            $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[])
     AS u(register_id, center_id, sent_at, agent_version, pending, rejected, acknowledged,
          last_seq, cursors, last_sync, last_error, heartbeat)
JOIN registers r
  ON r.register_id = u.register_id AND r.center_id = u.center_id AND r.revoked_at IS NULL
ON CONFLICT (register_id) DO UPDATE SET
    last_seen = EXCLUDED.last_seen, sent_at = EXCLUDED.sent_at,
    agent_version = EXCLUDED.agent_version, pending = EXCLUDED.pending,
    rejected = EXCLUDED.rejected, acknowledged = EXCLUDED.acknowledged,
    last_seq = EXCLUDED.last_seq, cursors = EXCLUDED.cursors,
    last_sync = EXCLUDED.last_sync, last_error = EXCLUDED.last_error,
    heartbeat = EXCLUDED.heartbeat
RETURNING register_id
"""
_FLEET = """
SELECT r.register_id, r.center_id, r.revoked_at, p.last_seen,
       p.last_seen >= now() - make_interval(secs => $2) AS online,
       p.agent_version, p.pending, p.rejected, p.acknowledged, p.last_seq, p.cursors,
       p.last_sync, p.last_error
FROM registers r LEFT JOIN register_presence p USING (register_id)
WHERE $1::text IS NULL OR r.center_id = $1
ORDER BY r.center_id, r.register_id
"""


@dataclass
class PresenceStats:
    """Counters of one process (all its presence workers), since it started."""

    batches: int = 0
    heartbeats: int = 0
    stored: int = 0
    refused: int = 0
    db_retries: int = 0


@dataclass(frozen=True)
class PresenceInfo:
    """One register in the fleet view; the heartbeat fields are None until its first."""

    register_id: str
    center_id: str
    revoked_at: datetime | None
    last_seen: datetime | None
    online: bool
    agent_version: str | None
    pending: int | None
    rejected: int | None
    acknowledged: int | None
    last_seq: int | None
    cursors: dict[str, int] | None
    last_sync: dict[str, Any] | None
    last_error: str | None

    @property
    def state(self) -> str:
        """``online``, ``offline``, ``never seen`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.last_seen is None:
            return "never seen"
        return "online" if self.online else "offline"


def _refused(code: str, field: str, reason: str) -> RejectedError:
    return RejectedError(reason, field=field, code=code)


def check_heartbeat(delivery: Delivery) -> Heartbeat | TillsyncError:
    """Steps 1-4 (everything but the registers table): the heartbeat, or why not."""
    if not delivery.user_id:
        return _refused(
            "missing_user_id",
            "user_id",
            "the message has no user_id: RabbitMQ vouches for the sender only when it is set",
        )
    parts = delivery.routing_key.split(".")
    if len(parts) != 3 or parts[0] != "hb" or not parts[1] or not parts[2]:
        return _refused(
            "invalid_routing_key",
            "routing_key",
            f"routing key {delivery.routing_key!r} is not hb.<center>.<register>",
        )
    try:
        message = decode_control(delivery.body)
    except ProtocolError as exc:
        return exc
    if not isinstance(message, Heartbeat):
        return _refused(
            "unknown_type", "type", f"a {message.type!r} message has no place in presence"
        )
    body = message.body
    if delivery.user_id != topology.register_username(body.register_id):
        return _refused(
            "identity_mismatch",
            "register_id",
            f"user_id {delivery.user_id!r} may not send heartbeats of register "
            f"{body.register_id!r}",
        )
    for field, routed, claimed in (
        ("center_id", parts[1], body.center_id),
        ("register_id", parts[2], body.register_id),
    ):
        if routed != claimed:
            return _refused(
                "identity_mismatch",
                field,
                f"the routing key says {routed!r}, the heartbeat's {field} says {claimed!r}",
            )
    return message


def _dead_letter(delivery: Delivery, error: TillsyncError, register_id: str | None) -> DeadLetter:
    return DeadLetter(
        source="presence",
        code=error.code,
        field=error.field or "",
        reason=error.reason,
        payload=delivery.body,
        routing_key=delivery.routing_key,
        user_id=delivery.user_id,
        message_id=delivery.message_id,
        register_id=register_id,
        headers=delivery.headers,
    )


def _upsert_args(latest: Sequence[tuple[Heartbeat, Delivery]]) -> list[list[Any]]:
    bodies = [heartbeat.body for heartbeat, _ in latest]
    return [
        [b.register_id for b in bodies],
        [b.center_id for b in bodies],
        [heartbeat.created_at for heartbeat, _ in latest],
        [b.agent_version for b in bodies],
        [b.pending for b in bodies],
        [b.rejected for b in bodies],
        [b.acknowledged for b in bodies],
        [b.last_seq for b in bodies],
        [json.dumps(b.cursors) for b in bodies],
        [None if b.last_sync is None else b.last_sync.model_dump_json() for b in bodies],
        [b.last_error for b in bodies],
        [json.dumps(to_json(heartbeat), ensure_ascii=False) for heartbeat, _ in latest],
    ]


class PresenceWorker(BatchConsumer):
    """One competing consumer of ``tillsync.presence``."""

    queue_name = topology.PRESENCE_QUEUE

    def __init__(
        self,
        settings: CentralSettings,
        pool: asyncpg.Pool,
        *,
        index: int = 0,
        stats: PresenceStats | None = None,
    ) -> None:
        super().__init__(
            settings.amqp_url.get_secret_value(), prefetch=1000, batch_size=500, max_wait=0.1
        )
        self.name = f"presence-{index}"
        self._pool = pool
        self._backoff = Backoff(DB_RETRY_BASE_S, DB_RETRY_CAP_S)
        self.stats = PresenceStats() if stats is None else stats

    async def handle(self, batch: Sequence[AbstractIncomingMessage], session: Session) -> bool:
        deliveries = [delivery_of(message) for message in batch]
        latest: dict[str, tuple[Heartbeat, Delivery]] = {}
        letters: list[DeadLetter] = []
        for delivery in deliveries:
            checked = check_heartbeat(delivery)
            if isinstance(checked, Heartbeat):
                latest[checked.body.register_id] = (checked, delivery)  # the last one wins
            else:
                letters.append(_dead_letter(delivery, checked, None))
        while True:
            try:
                stored, letters = await self._write(list(latest.values()), letters)
                break
            except Exception as exc:
                if is_transient(exc):
                    if not await self._wait_for_database(exc, session, len(batch)):
                        return False
                    continue
                # Bad data the checks let through: kept, never redelivered in a loop.
                log.error("heartbeats not stored", consumer=self.name, error=repr(exc))
                failed = TillsyncError(f"{type(exc).__name__}: {exc}", code="store_failed")
                stored, letters = await self._write(
                    [], [_dead_letter(d, failed, None) for d in deliveries]
                )
                break
        self._backoff.reset()
        self._count(len(batch), stored, letters)
        return True

    async def _write(
        self, latest: list[tuple[Heartbeat, Delivery]], letters: list[DeadLetter]
    ) -> tuple[int, list[DeadLetter]]:
        """Upsert the accepted, dead-letter the refused, in one transaction; returns how
        many were stored, and every dead letter (those of step 5 included)."""
        refused = list(letters)
        async with self._pool.acquire() as conn, conn.transaction():
            stored: set[str] = set()
            if latest:
                rows = await conn.fetch(_UPSERT, *_upsert_args(latest))
                stored = {row["register_id"] for row in rows}
            for heartbeat, delivery in latest:
                body = heartbeat.body
                if body.register_id not in stored:
                    error = _refused(
                        "unknown_register",
                        "register_id",
                        f"register {body.register_id!r} is not enrolled in center "
                        f"{body.center_id!r}, or is revoked",
                    )
                    refused.append(_dead_letter(delivery, error, body.register_id))
            if refused:
                await insert_dead_letters(conn, refused)
        return len(stored), refused

    async def _wait_for_database(self, exc: BaseException, session: Session, size: int) -> bool:
        delay = self._backoff.next()
        self.stats.db_retries += 1
        log.warning(
            "database unavailable, heartbeats kept for retry",
            consumer=self.name,
            batch_size=size,
            retry_in_s=round(delay, 2),
            error=f"{type(exc).__name__}: {exc}",
        )
        return await session.pause_before_retry(delay)

    def _count(self, size: int, stored: int, letters: list[DeadLetter]) -> None:
        self.stats.batches += 1
        self.stats.heartbeats += size
        self.stats.stored += stored
        self.stats.refused += len(letters)
        for letter in letters:
            log.warning(
                "heartbeat refused",
                consumer=self.name,
                code=letter.code,
                field=letter.field,
                reason=letter.reason,
                register_id=letter.register_id,
                user_id=letter.user_id,
                routing_key=letter.routing_key,
            )
        log.debug("heartbeats stored", consumer=self.name, size=size, refused=len(letters))


async def fleet_presence(
    pool: asyncpg.Pool, offline_after_s: float, center_id: str | None = None
) -> list[PresenceInfo]:
    """Every register (of one center) with its latest heartbeat; online when that is
    younger than ``offline_after_s``."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_FLEET, center_id, float(offline_after_s))
    return [
        PresenceInfo(**{**dict(row), "online": bool(row["online"])})  # NULL: never seen
        for row in rows
    ]
