"""A register as the catalog flow sees it, for tests: real AMQP, counting what arrives.

:class:`Inbox` consumes one register queue and keeps every control message decoded, in
arrival order, with its raw bytes (to tell a re-publication from a new message).
:class:`Requester` is an enrolled register publishing ``delta_request``s as the agent
does (``user_id`` = its broker user, ``reply_to`` its queue, ``correlation_id`` the
request id) and collecting the answer from its own queue.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from tillsync_central.provisioning import Enrollment
from tillsync_protocol import (
    CatalogChange,
    ControlMessage,
    DeltaEnd,
    DeltaPage,
    decode_control,
    encode,
    topology,
    validate,
)


@dataclass
class Received:
    message: ControlMessage
    body: bytes
    routing_key: str
    correlation_id: str | None


@dataclass
class Inbox:
    """Everything that arrived in one queue, decoded."""

    url: str
    queue: str
    received: list[Received] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _connection: AbstractConnection | None = None

    async def __aenter__(self) -> Inbox:
        self._connection = await aio_pika.connect(self.url, timeout=15)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue(self.queue, ensure=False)
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        decoded = decode_control(message.body)
        self.received.append(
            Received(decoded, bytes(message.body), message.routing_key or "",
                     message.correlation_id)
        )  # fmt: skip
        self._changed.set()

    def changes(self) -> list[CatalogChange]:
        return [r.message for r in self.received if isinstance(r.message, CatalogChange)]

    async def wait(self, predicate: Any, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()


async def declare_register_like_queue(url: str, register_id: str, center_id: str) -> str:
    """A register's queue and bindings, declared by an administrator (no broker user)."""
    connection = await aio_pika.connect(url, timeout=15)
    async with connection:
        channel = await connection.channel()
        name = topology.register_queue(register_id)
        queue = await channel.declare_queue(
            name, durable=True, arguments=topology.register_queue_arguments()
        )
        for binding in topology.register_queue_bindings(register_id, center_id):
            await queue.bind(binding.exchange, binding.routing_key)
    return name


@dataclass
class Answer:
    pages: list[DeltaPage]
    end: DeltaEnd

    @property
    def changes(self) -> list[Any]:
        return [change for page in self.pages for change in page.body.changes]


class Requester:
    """An enrolled register asking central for deltas and snapshots."""

    def __init__(self, enrollment: Enrollment) -> None:
        self.enrollment = enrollment
        self.register_id = enrollment.register_id
        self.center_id = enrollment.center_id
        self.inbox = Inbox(enrollment.amqp_url, topology.register_queue(self.register_id))
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> Requester:
        await self.inbox.__aenter__()
        self._connection = await aio_pika.connect(self.enrollment.amqp_url, timeout=15)
        self._channel = await self._connection.channel(publisher_confirms=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()
        await self.inbox.__aexit__()

    def request(self, **body: Any) -> dict[str, Any]:
        """A delta_request as a raw map (defaults: this register, delta mode)."""
        return {
            "v": [1, 0],
            "type": "delta_request",
            "created_at": 1_767_258_000_000,
            "msg_id": str(uuid.uuid4()),
            "body": {
                "request_id": str(uuid.uuid4()),
                "register_id": self.register_id,
                "center_id": self.center_id,
                **body,
            },
        }

    async def publish(self, raw: dict[str, Any], routing_key: str | None = None) -> str:
        assert self._channel is not None
        exchange = await self._channel.get_exchange(topology.RPC_EXCHANGE, ensure=False)
        request_id = str(raw["body"]["request_id"])
        key = routing_key or f"rpc.{self.center_id}.{self.register_id}.delta"
        await exchange.publish(
            aio_pika.Message(
                encode(validate(raw)),
                content_type=topology.CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=raw["msg_id"],
                correlation_id=request_id,
                reply_to=topology.register_queue(self.register_id),
                user_id=self.enrollment.broker_user,
            ),
            key,
            timeout=10,
        )
        return request_id

    async def answer(self, request_id: str, timeout: float = 30.0) -> Answer:
        def ended(inbox: Inbox) -> bool:
            return any(
                isinstance(r.message, DeltaEnd) and r.message.body.request_id == request_id
                for r in inbox.received
            )

        await self.inbox.wait(ended, timeout)
        mine = [r for r in self.inbox.received if r.correlation_id == request_id]
        pages = [r.message for r in mine if isinstance(r.message, DeltaPage)]
        ends = [r.message for r in mine if isinstance(r.message, DeltaEnd)]
        assert len(ends) == 1
        assert all(r.routing_key == f"reg.{self.register_id}.delta" for r in mine)
        return Answer(pages, ends[0])

    async def ask(self, **body: Any) -> Answer:
        return await self.answer(await self.publish(self.request(**body)))
