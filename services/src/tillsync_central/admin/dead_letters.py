"""Dead letters and conflicts for operators: list, counts per code, detail (decoded where
possible, raw hex always), replay after a fix, discard with a reason, resolve a conflict.

**Replay** cannot republish the stored bytes: the broker validates ``user_id`` against
the connection's user, so central could not send as ``reg-<id>``. It runs them through
ingest's own path instead, in this process: :func:`~tillsync_central.intake.inspect_kept`
(one document, or every document of a kept ``document_batch`` body; the
same checks, with the ``user_id`` and routing key the broker vouched for when the message
first arrived), :func:`~tillsync_central.store.store` (the same idempotent transaction)
and the register's ack, published on ``tillsync.registers`` as an ingest worker would.
A document already stored counts as replayed (the store is idempotent); a conflict is
recorded as ingest would record it. A replay the checks still refuse leaves the dead
letter ``new`` and answers ``replay_refused`` with the code, field and reason of now.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
import msgpack

from tillsync_protocol import ProtocolError, decode, to_json, topology

from ..acks import ack_messages
from ..confirms import publish_in_order
from ..dead_letters import json_safe
from ..intake import Delivery, inspect_kept
from ..settings import CentralSettings
from ..store import BatchResult, store
from .errors import AdminError

__all__ = [
    "DL_SOURCES",
    "DL_STATUSES",
    "Replay",
    "conflict_page",
    "dead_letter_counts",
    "dead_letter_detail",
    "dead_letter_page",
    "decode_payload",
    "discard",
    "replay",
    "resolve_conflict",
]

DL_STATUSES = ("new", "replayed", "discarded")
DL_SOURCES = ("ingest", "dlx", "presence")
REPLAYABLE = frozenset({"ingest", "dlx"})

_LIST = """
SELECT id, received_at, source, routing_key, user_id, message_id, register_id, seq, code,
       field, reason, octet_length(payload) AS size, status, status_reason, status_at
FROM dead_letters
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR code = $2)
  AND ($3::text IS NULL OR source = $3) AND ($4::text IS NULL OR register_id = $4)
  AND ($5::bigint IS NULL OR id < $5)
ORDER BY id DESC LIMIT $6
"""
_COUNTS = """
SELECT code, count(*) FILTER (WHERE status = 'new') AS new, count(*) AS total
FROM dead_letters GROUP BY code ORDER BY new DESC, code
"""
_ONE = """
SELECT id, received_at, source, routing_key, user_id, message_id, register_id, seq, code,
       field, reason, payload, headers, status, status_reason, status_at
FROM dead_letters WHERE id = $1
"""
_LOCK = "SELECT status FROM dead_letters WHERE id = $1 FOR UPDATE"
_SETTLE = """
UPDATE dead_letters SET status = $2, status_reason = $3, status_at = now()
WHERE id = $1 AND status = 'new'
"""
_REFUSAL = """
SELECT code, field, reason FROM dead_letters
WHERE payload_hash = sha256($1::bytea) AND status = 'new' ORDER BY id DESC LIMIT 1
"""
_CONFLICTS = """
SELECT 'content' AS family, id, kind AS code, register_id, seq, doc_id::text AS doc_id,
       detected_at, resolved_at, resolution, encode(incoming_payload, 'hex') AS payload_hex,
       NULL::text AS key, NULL::text AS reason
FROM conflicts WHERE ($1 OR resolved_at IS NULL)
UNION ALL
SELECT 'catalog', id, code, register_id, seq, doc_id::text, detected_at, NULL, NULL, NULL,
       key, reason
FROM catalog_conflicts
ORDER BY detected_at DESC LIMIT $2
"""
_RESOLVE = """
UPDATE conflicts SET resolved_at = now(), resolution = $2
WHERE id = $1 AND resolved_at IS NULL RETURNING id
"""


@dataclass(frozen=True)
class Replay:
    """What a replay did: ``stored``, ``duplicate`` (already there) or ``conflict``."""

    outcome: str
    register_id: str | None
    seq: int | None
    acks_published: int

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _iso(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def decode_payload(payload: bytes) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The payload decoded as a v1 message, else as plain MessagePack (JSON-safe), and the
    protocol error that made it fail (None when it decodes)."""
    try:
        return to_json(decode(payload)), None
    except ProtocolError as exc:
        error = exc.to_dict()
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:  # anything: these bytes are known to be bad
        return None, error
    value = json_safe(raw)
    return (value if isinstance(value, dict) else {"value": value}), error


async def dead_letter_page(
    pool: asyncpg.Pool,
    status: str | None,
    code: str | None,
    source: str | None,
    register: str | None,
    before: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    rows = await pool.fetch(_LIST, status, code, source, register, before, limit)
    return [_iso(dict(r)) for r in rows]


async def dead_letter_counts(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch(_COUNTS)]


async def dead_letter_detail(pool: asyncpg.Pool, letter_id: int) -> dict[str, Any]:
    row = await pool.fetchrow(_ONE, letter_id)
    if row is None:
        raise AdminError(f"no dead letter {letter_id}", field="id", code="unknown_dead_letter")
    detail = _iso(dict(row))
    payload = bytes(detail.pop("payload"))
    detail["payload_hex"] = payload.hex()
    detail["decoded"], detail["decode_error"] = decode_payload(payload)
    detail["replayable"] = row["source"] in REPLAYABLE and row["status"] == "new"
    return detail


async def discard(pool: asyncpg.Pool, letter_id: int, reason: str) -> None:
    """Mark a ``new`` dead letter discarded, with the operator's reason."""
    async with pool.acquire() as conn, conn.transaction():
        await _lock_new(conn, letter_id)
        await conn.execute(_SETTLE, letter_id, "discarded", reason)


async def _lock_new(conn: Any, letter_id: int) -> None:
    status = await conn.fetchval(_LOCK, letter_id)
    if status is None:
        raise AdminError(f"no dead letter {letter_id}", field="id", code="unknown_dead_letter")
    if status != "new":
        raise AdminError(
            f"dead letter {letter_id} is already {status}", field="id", code="already_settled"
        )


async def replay(
    pool: asyncpg.Pool, settings: CentralSettings, letter_id: int, note: str
) -> Replay:
    """Run a dead letter's bytes through ingest again (see the module's docstring)."""
    row = await pool.fetchrow(_ONE, letter_id)
    if row is None:
        raise AdminError(f"no dead letter {letter_id}", field="id", code="unknown_dead_letter")
    if row["status"] != "new":
        raise AdminError(
            f"dead letter {letter_id} is already {row['status']}",
            field="id",
            code="already_settled",
        )
    if row["source"] not in REPLAYABLE:
        raise AdminError(
            f"a {row['source']} dead letter is not a document: only ingest and dlx ones replay",
            field="source",
            code="not_replayable",
        )
    payload = bytes(row["payload"])
    delivery = Delivery(
        body=payload,
        routing_key=row["routing_key"] or "",
        user_id=row["user_id"],
        message_id=row["message_id"],
        headers=dict(row["headers"] or {}),
    )
    inspections = inspect_kept(delivery)
    for inspection in inspections:
        if inspection.error is not None:
            raise _refused(inspection.error.to_dict())
    result = await store(pool, inspections)
    if result.refused:
        refusal = await pool.fetchrow(_REFUSAL, payload)
        raise _refused(
            dict(refusal) if refusal else {"code": "refused", "field": "", "reason": "refused"}
        )
    acks = await _publish_acks(settings, result)
    outcome = "conflict" if result.conflicts else "stored" if result.stored else "duplicate"
    async with pool.acquire() as conn, conn.transaction():
        await _lock_new(conn, letter_id)
        await conn.execute(_SETTLE, letter_id, "replayed", note or outcome)
    first = inspections[0]  # a batch's documents: the register's, from the first seq
    return Replay(outcome, first.register_id, first.seq, acks)


def _refused(error: dict[str, Any]) -> AdminError:
    return AdminError(
        f"still refused: {error['code']}: {error['reason']}",
        field=str(error.get("field") or ""),
        code="replay_refused",
    )


async def _publish_acks(settings: CentralSettings, result: BatchResult) -> int:
    """The registers' acks, as an ingest worker publishes them after its commit."""
    messages = ack_messages(result)
    if not messages:
        return 0
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=15)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.REGISTERS_EXCHANGE, ensure=False)
        return await publish_in_order(exchange, messages)


async def conflict_page(
    pool: asyncpg.Pool, include_resolved: bool, limit: int
) -> list[dict[str, Any]]:
    """Document conflicts (same key, other bytes) and catalog edit conflicts, newest first."""
    return [_iso(dict(r)) for r in await pool.fetch(_CONFLICTS, include_resolved, limit)]


async def resolve_conflict(pool: asyncpg.Pool, conflict_id: int, resolution: str) -> None:
    if await pool.fetchval(_RESOLVE, conflict_id, resolution) is None:
        raise AdminError(
            f"no unresolved document conflict {conflict_id}", field="id", code="not_found"
        )
