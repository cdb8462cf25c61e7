"""A test-side stand-in for central's catalog: a changelog in memory, a delta RPC responder
and real-time publishing, over a real broker with aio-pika and tillsync_protocol (not a
mock of RabbitMQ). The register's queue and the shared topology are declared as central
declares them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from tillsync_central.topology import declare_topology
from tillsync_protocol import (
    BATCH_TYPE,
    CONTENT_TYPE,
    Ack,
    AckBody,
    CatalogChange,
    CatalogChangeBody,
    DeltaEnd,
    DeltaEndBody,
    DeltaPage,
    DeltaPageBody,
    DeltaRequest,
    DeltaRequestBody,
    Reinit,
    ReinitBody,
    Rejection,
    SeqRange,
    decode_control,
    decode_document,
    encode,
    split_batch,
    topology,
)
from tillsync_protocol.envelope import ControlMessage

from .catalog import item_state

REGISTER = "r-1"
CENTER = "c-1"


def _now() -> int:
    return 1_767_258_000_000


@dataclass
class FakeCentral:
    """Central's catalog as far as a register can tell: per-scope changelogs."""

    channel: AbstractChannel
    changelog: dict[str, list[CatalogChangeBody]] = field(default_factory=dict)
    requests: list[DeltaRequestBody] = field(default_factory=list)
    documents: list[Any] = field(default_factory=list)
    answer_delay: float = 0.0
    silent: bool = False
    error_code: str | None = None
    """Answer the next delta request with this error_code (then normally again)."""
    versions: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def edit(
        self,
        key: str,
        state: dict[str, Any] | None = None,
        *,
        entity: str = "items",
        scope: str = "global",
        delete: bool = False,
    ) -> CatalogChangeBody:
        """Commit a change in the changelog (not published: see :meth:`publish`)."""
        log = self.changelog.setdefault(scope, [])
        version = self.versions.get((scope, entity, key), 0) + 1
        self.versions[(scope, entity, key)] = version
        change = CatalogChangeBody.model_validate(
            {
                "scope": scope,
                "scope_seq": len(log) + 1,
                "entity": entity,
                "key": key,
                "op": "delete" if delete else "upsert",
                "version": version,
                "state": None if delete else (state or item_state(key)),
            }
        )
        log.append(change)
        return change

    async def publish(self, change: CatalogChangeBody) -> None:
        message = CatalogChange(msg_id=str(uuid.uuid4()), created_at=_now(), body=change)
        await self._publish(
            topology.CATALOG_EXCHANGE, topology.catalog_key(change.scope, change.entity), message
        )

    async def command_reinit(self, mode: str, **options: Any) -> None:
        body = ReinitBody.model_validate(
            {"command_id": str(uuid.uuid4()), "mode": mode, "requested_by": "admin", **options}
        )
        message = Reinit(msg_id=str(uuid.uuid4()), created_at=_now(), body=body)
        await self._publish(
            topology.REGISTERS_EXCHANGE, topology.register_key(REGISTER, "command"), message
        )

    async def ack(self, seq: int, *, rejection_code: str | None = None) -> None:
        body = AckBody(
            register_id=REGISTER,
            accepted=[] if rejection_code else [SeqRange(first=seq, last=seq)],
            rejected=[Rejection(seq=seq, code=rejection_code, reason="central won")]
            if rejection_code
            else [],
        )
        message = Ack(msg_id=str(uuid.uuid4()), created_at=_now(), body=body)
        await self._publish(
            topology.REGISTERS_EXCHANGE, topology.register_key(REGISTER, "ack"), message
        )

    async def _publish(
        self,
        exchange_name: str,
        key: str,
        message: ControlMessage,
        correlation_id: str | None = None,
    ) -> None:
        exchange = await self.channel.get_exchange(exchange_name, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                encode(message),
                content_type=CONTENT_TYPE,
                message_id=message.msg_id,
                type=message.type,
                correlation_id=correlation_id,
            ),
            key,
        )

    def answer(self, request: DeltaRequestBody) -> list[CatalogChangeBody]:
        changes: list[CatalogChangeBody] = []
        for scope in (topology_scope for topology_scope in ("global", CENTER)):
            latest: dict[tuple[str, str], CatalogChangeBody] = {}
            after = request.cursors.get(scope, 0) if request.mode == "delta" else 0
            for change in self.changelog.get(scope, []):
                if change.scope_seq > after:
                    latest[(change.entity, change.key)] = change
            for change in sorted(latest.values(), key=lambda c: c.scope_seq):
                if request.entities is not None and change.entity not in request.entities:
                    continue
                if not request.with_customers and change.entity in (
                    "customers",
                    "loyalty_balances",
                ):
                    continue
                if request.mode == "snapshot" and change.op == "delete":
                    continue
                changes.append(change)
        return changes

    async def on_request(self, message: AbstractIncomingMessage) -> None:
        request = decode_control(message.body)
        assert isinstance(request, DeltaRequest)
        assert message.correlation_id == request.body.request_id
        assert message.reply_to == topology.register_queue(REGISTER)
        assert message.routing_key == f"rpc.{CENTER}.{REGISTER}.delta"
        self.requests.append(request.body)
        await message.ack()
        if self.silent:
            return
        await asyncio.sleep(self.answer_delay)
        body = request.body
        error_code = self.error_code if body.mode == "delta" else None
        self.error_code = None  # once
        changes = self.answer(body)
        cursors = {s: len(self.changelog.get(s, [])) for s in ("global", CENTER)}
        size = body.page_size
        pages = [changes[i : i + size] for i in range(0, len(changes), size)]
        key = topology.register_key(REGISTER, "delta")
        if error_code is None:
            for number, page in enumerate(pages, start=1):
                reply = DeltaPage(
                    msg_id=str(uuid.uuid4()),
                    created_at=_now(),
                    body=DeltaPageBody(request_id=body.request_id, page_no=number, changes=page),
                )
                await self._publish(topology.REGISTERS_EXCHANGE, key, reply, body.request_id)
        end = DeltaEnd(
            msg_id=str(uuid.uuid4()),
            created_at=_now(),
            body=DeltaEndBody(
                request_id=body.request_id,
                pages=0 if error_code else len(pages),
                changes=0 if error_code else len(changes),
                cursors=body.cursors if error_code else cursors,
                error_code=error_code,
                error_reason="refused by the test" if error_code else None,
            ),
        )
        await self._publish(topology.REGISTERS_EXCHANGE, key, end, body.request_id)

    async def on_document(self, message: AbstractIncomingMessage) -> None:
        # Several due documents come as one document_batch, as central accepts them.
        if message.type == BATCH_TYPE:
            self.documents.extend(decode_document(d) for d in split_batch(message.body))
        else:
            self.documents.append(decode_document(message.body))
        await message.ack()


@asynccontextmanager
async def fake_central(amqp_url: str) -> AsyncIterator[FakeCentral]:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await declare_topology(channel)
        queue = await channel.declare_queue(
            topology.register_queue(REGISTER),
            durable=True,
            arguments=topology.register_queue_arguments(),
        )
        for binding in topology.register_queue_bindings(REGISTER, CENTER):
            await queue.bind(binding.exchange, binding.routing_key)
        central = FakeCentral(channel)
        rpc = await channel.get_queue(topology.RPC_QUEUE, ensure=False)
        await rpc.consume(central.on_request)
        ingest = await channel.get_queue(topology.INGEST_QUEUE, ensure=False)
        await ingest.consume(central.on_document)
        yield central
    finally:
        await connection.close()
