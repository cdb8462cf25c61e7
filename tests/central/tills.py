"""A register as central sees it, for tests: real AMQP, logged in as the register's user.

:class:`Till` builds documents (as raw maps, so tests can break them), publishes them
exactly as the agent does (persistent, ``message_id=doc_id``, ``user_id`` = its broker
user, publisher confirms) and reads the acks from its own queue.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import msgpack
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from tillsync_central.provisioning import Enrollment
from tillsync_protocol import (
    BATCH_TYPE,
    Ack,
    Rejection,
    decode_control,
    encode,
    encode_batch,
    topology,
    validate,
)

T0 = 1_767_258_000_000


def receipt_body(n: int, total: int = 2500) -> dict[str, Any]:
    return {
        "receipt_no": f"R-{n:06d}",
        "shift_no": 1,
        "employee_id": "emp-1",
        "currency": "CZK",
        "lines": [
            {
                "line_no": 1,
                "item_id": "bread",
                "name": "Bread",
                "qty_milli": 1000,
                "unit_price": total,
                "tax_rate_id": "cz-12",
                "tax_rate_bp": 1200,
                "total": total,
            }
        ],
        "payments": [{"method_id": "cash", "amount": total}],
        "total": total,
    }


def sale_body(n: int, lines: list[tuple[str, int]]) -> dict[str, Any]:
    """A receipt body of 1.00 a line, ``lines`` as (item_id, qty_milli): what stock counts."""
    body = receipt_body(n, total=100 * len(lines))
    template = body["lines"][0]
    body["lines"] = [
        {**template, "line_no": i + 1, "item_id": item, "qty_milli": qty, "total": 100}
        for i, (item, qty) in enumerate(lines)
    ]
    return body


def raw_document(
    center_id: str, register_id: str, seq: int, doc_type: str = "receipt", body: Any = None
) -> dict[str, Any]:
    """A valid document as a plain map (break it freely, then :func:`pack` it)."""
    return {
        "v": [1, 0],
        "type": doc_type,
        "created_at": T0 + seq * 1000,
        "doc_id": str(uuid.uuid4()),
        "register_id": register_id,
        "center_id": center_id,
        "seq": seq,
        "body": receipt_body(seq) if body is None else body,
    }


def pack(raw: dict[str, Any]) -> bytes:
    """Raw bytes of a map, valid or not (no validation)."""
    return bytes(msgpack.packb(raw, use_bin_type=True))


def canonical(raw: dict[str, Any]) -> bytes:
    """The agent's bytes for a valid document (validated, then encoded canonically)."""
    return encode(validate(raw))


@dataclass
class AckLog:
    """Everything acks told one register."""

    accepted: set[int] = field(default_factory=set)
    accepted_count: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, Rejection] = field(default_factory=dict)
    messages: int = 0

    def add(self, ack: Ack) -> None:
        self.messages += 1
        for seq_range in ack.body.accepted:
            for seq in range(seq_range.first, seq_range.last + 1):
                self.accepted.add(seq)
                self.accepted_count[seq] = self.accepted_count.get(seq, 0) + 1
        for rejection in ack.body.rejected:
            self.rejected[rejection.seq] = rejection


class Till:
    """One register's connection: publishes documents, collects its acks."""

    def __init__(self, enrollment: Enrollment) -> None:
        self.enrollment = enrollment
        self.register_id = enrollment.register_id
        self.center_id = enrollment.center_id
        self.acks = AckLog()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Till:
        self._connection = await aio_pika.connect(self.enrollment.amqp_url, timeout=15)
        self._channel = await self._connection.channel(publisher_confirms=True)
        consume = await self._connection.channel()
        queue = await consume.get_queue(topology.register_queue(self.register_id), ensure=False)
        await queue.consume(self._on_ack, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_ack(self, message: AbstractIncomingMessage) -> None:
        control = decode_control(message.body)
        assert isinstance(control, Ack), control
        assert control.body.register_id == self.register_id
        self.acks.add(control)
        self._changed.set()

    def document(self, seq: int, doc_type: str = "receipt", body: Any = None) -> dict[str, Any]:
        return raw_document(self.center_id, self.register_id, seq, doc_type, body)

    async def publish(
        self,
        payload: bytes,
        *,
        doc_type: str = "receipt",
        routing_key: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Publish as the agent does; raises if the broker refuses it."""
        assert self._channel is not None
        exchange = await self._channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
        key = routing_key or topology.document_key(self.center_id, self.register_id, doc_type)
        message = aio_pika.Message(
            payload,
            content_type=topology.CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id or str(uuid.uuid4()),
            user_id=self.enrollment.broker_user,
        )
        await exchange.publish(message, key, timeout=10)

    async def publish_batch(self, payloads: list[bytes]) -> None:
        """``payloads`` (encoded documents) in one ``document_batch``, as the agent does."""
        await self.publish(encode_batch(payloads), doc_type=BATCH_TYPE)

    async def publish_documents(self, raws: Iterable[dict[str, Any]]) -> list[bytes]:
        payloads = []
        for raw in raws:
            payload = canonical(raw)
            await self.publish(payload, doc_type=raw["type"], message_id=raw["doc_id"])
            payloads.append(payload)
        return payloads

    async def wait_for(self, seqs: Iterable[int], timeout: float = 30.0) -> AckLog:
        """Until every seq in ``seqs`` is accepted or rejected by some ack."""
        wanted = set(seqs)
        async with asyncio.timeout(timeout):
            while not wanted <= (self.acks.accepted | set(self.acks.rejected)):
                self._changed.clear()
                await self._changed.wait()
        return self.acks


async def count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    """The integer a ``SELECT count(*) …`` gives."""
    async with pool.acquire() as conn:
        return int(await conn.fetchval(sql, *args))


async def store_seqs(pool: asyncpg.Pool, register_id: str, center_id: str, seqs: range) -> None:
    """``documents`` rows for ``seqs``, written straight by SQL (no payload worth reading):
    for tests of what reads only the keys, such as ``register_state`` and holes."""
    await pool.execute(
        "INSERT INTO documents (register_id, seq, doc_id, center_id, doc_type, created_at,"
        " payload, payload_json, content_hash)"
        " SELECT $1, s, gen_random_uuid(), $2, 'receipt', now(), '\\x00', '{}',"
        " sha256(int8send(s)) FROM unnest($3::bigint[]) AS s",
        register_id,
        center_id,
        list(seqs),
    )


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.1
) -> None:
    """Poll ``check`` until it is true; ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(interval)


def documents_rows_read(plan: list[dict[str, Any]]) -> int:
    """The ``documents`` rows an ``EXPLAIN (ANALYZE, FORMAT JSON)`` plan read, over all
    its loops: what a statement costs as a register's history grows."""

    def reads(node: dict[str, Any]) -> int:
        own = 0
        if node.get("Relation Name") == "documents":
            own = node["Actual Rows"] * node["Actual Loops"]
        return own + sum(reads(child) for child in node.get("Plans", []))

    return reads(plan[0]["Plan"])


_STATE_BEHIND = """
SELECT count(*) FROM (SELECT register_id, max(seq) AS last FROM documents GROUP BY 1) d
LEFT JOIN register_state s USING (register_id)
WHERE s.last_seq IS NULL OR s.last_seq < d.last
"""


async def state_settled(pool: asyncpg.Pool, timeout: float = 10.0) -> None:
    """Until ``register_state`` covers every stored document: ingest moves it on right
    after publishing its acks, so a test holding its acks waits for that too."""

    async def caught_up() -> bool:
        return bool(await pool.fetchval(_STATE_BEHIND) == 0)

    await until(caught_up, timeout=timeout, interval=0.02)
