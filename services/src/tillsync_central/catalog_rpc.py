"""The catalog RPC worker: answers ``delta_request``s from ``tillsync.rpc.catalog``.

For each request: decode it strictly, check the sender (the AMQP ``user_id`` is
``reg-<body.register_id>`` of a known, non-revoked register of ``body.center_id``, and
the routing key is ``rpc.<center>.<register>.delta``), then read, in one REPEATABLE READ
transaction, what the register's scopes (``global`` and its center) hold:

* ``mode=delta``: the latest state of every key changed after the register's cursor of
  its scope (a missing cursor is 0), deleted keys as ``op=delete``;
* ``mode=snapshot``: every live key;

filtered by ``entities`` and, with ``with_customers=false``, without the customer
entities. The answer goes to ``tillsync.registers`` with key ``reg.<register>.delta``
(``correlation_id`` = ``request_id``): ``delta_page``s of at most ``page_size`` changes
(and at most ~768 KiB), then one ``delta_end`` with the cursors the register reaches:
each scope's ``last_seq`` in that same transaction.

A request that fails a check is kept as a dead letter (``source='rpc'``) and, when the
broker vouched for a register (its ``user_id``), answered with a ``delta_end`` carrying
``error_code`` and ``error_reason`` and the register's own cursors unchanged.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aio_pika
import asyncpg
import msgpack
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from pydantic_core import from_json

from tillsync_protocol import (
    CONTENT_TYPE,
    CUSTOMER_ENTITIES,
    ENTITIES,
    GLOBAL_SCOPE,
    Backoff,
    ControlMessage,
    DeltaEnd,
    DeltaEndBody,
    DeltaPage,
    DeltaPageBody,
    DeltaRequest,
    ProtocolError,
    RejectedError,
    TillsyncError,
    decode_control,
    encode,
    topology,
)

from .consumer import BatchConsumer, Session, wait_any
from .dead_letters import Conn, DeadLetter, insert_dead_letters
from .ingest import delivery_of
from .intake import Delivery, register_of_user
from .settings import CentralSettings
from .store import is_transient

__all__ = ["PAGE_MAX_BYTES", "CatalogRpcWorker", "RpcStats"]

log = structlog.get_logger(__name__)

PAGE_MAX_BYTES = 768 * 1024
"""A page is cut before it grows past this (the protocol's limit is 1 MiB a message)."""
PUBLISH_TIMEOUT_S = 10.0
PAGES_IN_FLIGHT = 8
"""Pages of one answer published and awaiting their confirm while the next are read."""
DB_RETRY_BASE_S = 0.2
DB_RETRY_CAP_S = 10.0

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

_REGISTERS = """
SELECT register_id, center_id, revoked_at FROM registers WHERE register_id = ANY($1::text[])
"""
_LAST_SEQS = "SELECT scope, last_seq FROM catalog_scopes WHERE scope = ANY($1::text[])"
_DELTA = """
SELECT entity, key, version, scope_seq, state::text AS state, deleted FROM catalog_entities
WHERE scope = $1 AND scope_seq > $2 AND entity = ANY($3::text[])
ORDER BY scope_seq
"""
_SNAPSHOT = """
SELECT entity, key, version, scope_seq, state::text AS state, deleted FROM catalog_entities
WHERE scope = $1 AND NOT deleted AND entity = ANY($2::text[])
ORDER BY scope_seq
"""


@dataclass
class RpcStats:
    requests: int = 0
    answered: int = 0
    refused: int = 0
    pages: int = 0
    changes: int = 0
    db_retries: int = 0


@dataclass(frozen=True)
class _Register:
    register_id: str
    center_id: str
    revoked: bool


class CatalogRpcWorker(BatchConsumer):
    """One competing consumer of ``tillsync.rpc.catalog``; one request at a time."""

    queue_name = topology.RPC_QUEUE

    def __init__(
        self,
        settings: CentralSettings,
        pool: asyncpg.Pool,
        *,
        index: int = 0,
        stats: RpcStats | None = None,
    ) -> None:
        super().__init__(settings.amqp_url.get_secret_value(), prefetch=4, batch_size=1, max_wait=0)
        self.name = f"catalog-rpc-{index}"
        self._pool = pool
        self.stats = RpcStats() if stats is None else stats
        self._backoff = Backoff(DB_RETRY_BASE_S, DB_RETRY_CAP_S)

    async def handle(self, batch: Sequence[AbstractIncomingMessage], session: Session) -> bool:
        exchange = await session.publish_channel.get_exchange(
            topology.REGISTERS_EXCHANGE, ensure=False
        )
        for message in batch:
            delivery = delivery_of(message)
            delivery_correlation = message.correlation_id or None
            while True:
                try:
                    await self._serve(delivery, delivery_correlation, exchange)
                    break
                except Exception as exc:
                    if not is_transient(exc) or session.should_abandon():
                        raise
                    delay = self._backoff.next()
                    self.stats.db_retries += 1
                    log.warning(
                        "database unavailable, request kept for retry",
                        consumer=self.name,
                        retry_in_s=round(delay, 2),
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    if await wait_any((session.closed, session.stopping), delay):
                        return False
            self._backoff.reset()
        return True

    async def _serve(
        self, delivery: Delivery, correlation_id: str | None, exchange: AbstractExchange
    ) -> None:
        self.stats.requests += 1
        request, error = _decode(delivery)
        async with self._pool.acquire() as conn:
            registers = await _registers(conn, delivery, request)
            if error is None and request is not None:
                error = _check_sender(request, delivery, registers)
            if error is None and request is not None:
                try:
                    await self._answer(conn, request, registers, exchange)
                    return
                except TillsyncError as exc:
                    error = exc
            assert error is not None
            await self._refuse(conn, delivery, request, correlation_id, error, registers, exchange)

    async def _answer(
        self,
        conn: Conn,
        request: DeltaRequest,
        registers: dict[str, _Register],
        exchange: AbstractExchange,
    ) -> None:
        body = request.body
        started = time.monotonic()
        entities = [
            e
            for e in (body.entities or ENTITIES)
            if body.with_customers or e not in CUSTOMER_ENTITIES
        ]
        scopes = [GLOBAL_SCOPE, body.center_id]
        key = topology.register_key(body.register_id, "delta")
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            last_seqs = await _last_seqs(conn, scopes, body.cursors)
            pages, changes = await self._publish_pages(
                exchange,
                _pages(conn, body.mode, scopes, body.cursors, entities, body.page_size),
                key,
                body.request_id,
            )
        end = DeltaEnd(
            msg_id=str(uuid.uuid4()),
            created_at=_now_ms(),
            body=DeltaEndBody(
                request_id=body.request_id, pages=pages, changes=changes, cursors=last_seqs
            ),
        )
        await self._publish(exchange, end, key, body.request_id)
        self.stats.answered += 1
        self.stats.pages += pages
        self.stats.changes += changes
        log.info(
            "delta answered",
            register_id=body.register_id,
            request_id=body.request_id,
            mode=body.mode,
            pages=pages,
            changes=changes,
            cursors=last_seqs,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _publish_pages(
        self,
        exchange: AbstractExchange,
        pages: AsyncIterator[list[bytes]],
        key: str,
        request_id: str,
    ) -> tuple[int, int]:
        """Publish every page in order, up to ``PAGES_IN_FLIGHT`` awaiting their confirm
        while the next ones are read; returns (pages, changes) once all are confirmed."""
        in_flight: deque[asyncio.Task[None]] = deque()
        count = changes = 0
        try:
            async for page in pages:
                count += 1
                changes += len(page)
                msg_id = str(uuid.uuid4())
                data = _page_bytes(request_id, count, msg_id, page)
                if len(in_flight) >= PAGES_IN_FLIGHT:
                    await in_flight.popleft()
                # Tasks take the channel's lock in creation order: pages leave in order.
                in_flight.append(
                    asyncio.create_task(
                        self._publish_bytes(exchange, data, msg_id, "delta_page", key, request_id)
                    )
                )
            while in_flight:
                await in_flight.popleft()
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
        return count, changes

    async def _refuse(
        self,
        conn: Conn,
        delivery: Delivery,
        request: DeltaRequest | None,
        correlation_id: str | None,
        error: TillsyncError,
        registers: dict[str, _Register],
        exchange: AbstractExchange,
    ) -> None:
        self.stats.refused += 1
        target = _attributable(delivery, registers)
        request_id = request.body.request_id if request is not None else None
        if request_id is None and correlation_id and _UUID.match(correlation_id):
            request_id = correlation_id
        claimed = request.body.register_id if request is not None else None
        async with conn.transaction():
            await insert_dead_letters(
                conn,
                [
                    DeadLetter(
                        source="rpc",
                        code=error.code,
                        field=error.field,
                        reason=error.reason,
                        payload=delivery.body,
                        routing_key=delivery.routing_key,
                        user_id=delivery.user_id,
                        message_id=delivery.message_id,
                        register_id=claimed or target,
                        headers=delivery.headers,
                    )
                ],
            )
        log.warning(
            "delta request refused",
            code=error.code,
            field=error.field,
            reason=error.reason,
            user_id=delivery.user_id,
            routing_key=delivery.routing_key,
            register_id=claimed,
            answered_to=target if request_id else None,
        )
        if target is None or request_id is None:
            return
        cursors = dict(request.body.cursors) if request is not None else {}
        end = DeltaEnd(
            msg_id=str(uuid.uuid4()),
            created_at=_now_ms(),
            body=DeltaEndBody(
                request_id=request_id,
                pages=0,
                changes=0,
                cursors=cursors,
                error_code=error.code,
                error_reason=error.reason[:1000],
            ),
        )
        await self._publish(exchange, end, topology.register_key(target, "delta"), request_id)

    async def _publish(
        self, exchange: AbstractExchange, message: ControlMessage, key: str, request_id: str
    ) -> None:
        await self._publish_bytes(
            exchange, encode(message), message.msg_id, message.type, key, request_id
        )

    async def _publish_bytes(
        self,
        exchange: AbstractExchange,
        data: bytes,
        msg_id: str,
        message_type: str,
        key: str,
        request_id: str,
    ) -> None:
        await exchange.publish(
            aio_pika.Message(
                data,
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=msg_id,
                correlation_id=request_id,
                type=message_type,
                app_id="tillsync-central",
            ),
            key,
            mandatory=False,
            timeout=PUBLISH_TIMEOUT_S,
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _decode(delivery: Delivery) -> tuple[DeltaRequest | None, TillsyncError | None]:
    try:
        message = decode_control(delivery.body)
    except ProtocolError as exc:
        return None, exc
    if not isinstance(message, DeltaRequest):
        return None, ProtocolError(
            f"{message.type!r} is not a request central answers (only delta_request)",
            field="type",
            code="unknown_type",
        )
    return message, None


async def _registers(
    conn: Conn, delivery: Delivery, request: DeltaRequest | None
) -> dict[str, _Register]:
    ids = {register_of_user(delivery.user_id)}
    if request is not None:
        ids.add(request.body.register_id)
    wanted = sorted(i for i in ids if i is not None)
    if not wanted:
        return {}
    rows = await conn.fetch(_REGISTERS, wanted)
    return {
        r["register_id"]: _Register(r["register_id"], r["center_id"], r["revoked_at"] is not None)
        for r in rows
    }


def _attributable(delivery: Delivery, registers: dict[str, _Register]) -> str | None:
    """The register the broker vouched for (its ``user_id``), if known and active."""
    register_id = register_of_user(delivery.user_id)
    row = registers.get(register_id) if register_id is not None else None
    return None if row is None or row.revoked else row.register_id


def _check_sender(
    request: DeltaRequest, delivery: Delivery, registers: dict[str, _Register]
) -> TillsyncError | None:
    body = request.body
    if not delivery.user_id:
        return RejectedError(
            "the request has no user_id: RabbitMQ vouches for the sender only when it is set",
            field="user_id",
            code="missing_user_id",
        )
    if delivery.user_id != topology.register_username(body.register_id):
        return RejectedError(
            f"user_id {delivery.user_id!r} may not ask for register {body.register_id!r}",
            field="body.register_id",
            code="identity_mismatch",
        )
    expected_key = f"rpc.{body.center_id}.{body.register_id}.delta"
    if delivery.routing_key != expected_key:
        return RejectedError(
            f"routing key {delivery.routing_key!r} is not {expected_key!r}",
            field="routing_key",
            code="invalid_routing_key",
        )
    row = registers.get(body.register_id)
    if row is None or row.revoked:
        return RejectedError(
            f"register {body.register_id!r} is {'unknown' if row is None else 'revoked'}",
            field="body.register_id",
            code="unknown_register",
        )
    if row.center_id != body.center_id:
        return RejectedError(
            f"register {body.register_id!r} belongs to center {row.center_id!r}, "
            f"not {body.center_id!r}",
            field="body.center_id",
            code="unknown_register",
        )
    return None


async def _last_seqs(conn: Conn, scopes: list[str], cursors: dict[str, int]) -> dict[str, int]:
    rows = await conn.fetch(_LAST_SEQS, scopes)
    last = {r["scope"]: int(r["last_seq"]) for r in rows}
    for scope in scopes:
        if scope not in last:
            raise TillsyncError(
                f"no catalog scope {scope!r}", field="body.center_id", code="unknown_scope"
            )
    for scope, cursor in cursors.items():
        if scope not in last:
            raise TillsyncError(
                f"{scope!r} is not a scope of this register (it reads {' and '.join(scopes)})",
                field=f"body.cursors.{scope}",
                code="unknown_scope",
            )
        if cursor > last[scope]:
            raise TillsyncError(
                f"cursor {cursor} of scope {scope!r} is past its last change {last[scope]}: "
                "the register's catalog is from another central database; reinit it",
                field=f"body.cursors.{scope}",
                code="cursor_ahead",
            )
    return {scope: last[scope] for scope in scopes}


_EMPTY_ARRAY = b"\x90"

_packer = msgpack.Packer(use_bin_type=True)
"""Packs one change at a time (``autoreset``: each ``pack`` returns its own bytes)."""


def _page_bytes(request_id: str, page_no: int, msg_id: str, changes: list[bytes]) -> bytes:
    """A ``delta_page`` exactly as ``encode`` writes it, from changes packed one by one.

    The envelope is the validated model with no changes; ``changes`` is the last field of
    the last field, so its empty array ends the bytes and is replaced by the packed
    changes (tests compare the result with ``encode`` of the whole model).
    """
    envelope = encode(
        DeltaPage(
            msg_id=msg_id,
            created_at=_now_ms(),
            body=DeltaPageBody(request_id=request_id, page_no=page_no, changes=[]),
        )
    )
    if not envelope.endswith(_EMPTY_ARRAY):
        raise AssertionError("delta_page no longer ends with its changes")
    return b"".join((envelope[:-1], _packer.pack_array_header(len(changes)), *changes))


def _pack_change(scope: str, row: asyncpg.Record) -> bytes:
    # Rows of our own catalog_entities were validated when they were written (the catalog
    # editor), so they are packed as they are, fields in CatalogChangeBody's order. The
    # state is read as text and parsed by pydantic_core's JSON parser: the same objects as
    # the pool's json.loads codec gives (jsonb has no duplicate keys, no floats here),
    # 2.5 times faster, and an answer parses every state of the catalog.
    state = row["state"]
    return _packer.pack(  # type: ignore[no-any-return]
        {
            "scope": scope,
            "scope_seq": row["scope_seq"],
            "entity": row["entity"],
            "key": row["key"],
            "op": "delete" if row["deleted"] else "upsert",
            "version": row["version"],
            "state": None if state is None else from_json(state),
        }
    )


async def _pages(
    conn: Conn,
    mode: str,
    scopes: list[str],
    cursors: dict[str, int],
    entities: list[str],
    page_size: int,
) -> AsyncIterator[list[bytes]]:
    """The changes to send, each packed, cut into pages (by count, and by size before a
    page outgrows ``PAGE_MAX_BYTES``), read through a server-side cursor."""
    page: list[bytes] = []
    page_bytes = 0
    for scope in scopes:
        if mode == "snapshot":
            rows = conn.cursor(_SNAPSHOT, scope, entities, prefetch=page_size)
        else:
            rows = conn.cursor(_DELTA, scope, cursors.get(scope, 0), entities, prefetch=page_size)
        async for row in rows:
            change = _pack_change(scope, row)
            if page and (len(page) >= page_size or page_bytes + len(change) > PAGE_MAX_BYTES):
                yield page
                page, page_bytes = [], 0
            page.append(change)
            page_bytes += len(change)
    if page:
        yield page
