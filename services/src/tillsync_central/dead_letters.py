"""Dead letters: input that could not be applied, kept with its raw bytes.

Ingest writes one for every refused delivery (``source='ingest'``), in the transaction of
its batch; the dead-letter consumer (:class:`tillsync_central.ingest.DeadLetterWorker`) writes
one for every message the broker gave up on after the delivery limit
(``source='dlx'``, code ``delivery_limit``). A redelivered message records nothing new:
a row with the same source, code, bytes, routing key and user that is still ``new`` is
not written again.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = ["Conn", "DeadLetter", "insert_dead_letters", "json_safe"]


Conn = asyncpg.Connection | PoolConnectionProxy
"""A connection, or one borrowed from a pool."""


@dataclass(frozen=True)
class DeadLetter:
    source: str
    code: str
    field: str
    reason: str
    payload: bytes
    routing_key: str | None = None
    user_id: str | None = None
    message_id: str | None = None
    register_id: str | None = None
    seq: int | None = None
    headers: Mapping[str, Any] | None = None


_INSERT = """
INSERT INTO dead_letters (source, routing_key, user_id, message_id, register_id, seq, code,
                          field, reason, payload, headers)
SELECT u.source, u.routing_key, u.user_id, u.message_id, u.register_id, u.seq, u.code,
       u.field, u.reason, u.payload, u.headers::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::text[], $8::text[], $9::text[], $10::bytea[], $11::text[])
     AS u(source, routing_key, user_id, message_id, register_id, seq, code, field, reason,
          payload, headers)
WHERE NOT EXISTS (
    SELECT 1 FROM dead_letters d
    WHERE d.payload_hash = sha256(u.payload) AND d.source = u.source AND d.code = u.code
      AND d.status = 'new'
      AND d.routing_key IS NOT DISTINCT FROM u.routing_key
      AND d.user_id IS NOT DISTINCT FROM u.user_id
)
"""


async def insert_dead_letters(conn: Conn, letters: Sequence[DeadLetter]) -> int:
    """Write the dead letters not already kept; return how many rows were written."""
    unique: dict[tuple[Any, ...], DeadLetter] = {}
    for letter in letters:
        digest = hashlib.sha256(letter.payload).digest()
        key = (letter.source, letter.code, digest, letter.routing_key, letter.user_id)
        unique.setdefault(key, letter)
    if not unique:
        return 0
    rows = list(unique.values())
    status = await conn.execute(
        _INSERT,
        [r.source for r in rows],
        [r.routing_key for r in rows],
        [r.user_id for r in rows],
        [r.message_id for r in rows],
        [r.register_id for r in rows],
        [r.seq for r in rows],
        [r.code for r in rows],
        [r.field for r in rows],
        [r.reason for r in rows],
        [r.payload for r in rows],
        [json.dumps(json_safe(dict(r.headers or {})), ensure_ascii=False) for r in rows],
    )
    return int(status.rsplit(" ", 1)[-1])


def json_safe(value: Any) -> Any:
    """AMQP header values as JSON: bytes become UTF-8 text (or ``{"base64": …}``),
    timestamps ISO strings, decimals strings; nested tables and arrays are walked."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(data).decode("ascii")}
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return str(value)
