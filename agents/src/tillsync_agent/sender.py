"""The sender: publishes due outbox rows in seq order, many in flight, with confirms.

A row counts as published only on a real ``Basic.Ack`` for a *routed* message: the
channel is opened with ``on_return_raises`` and every publish is ``mandatory``, so an
unroutable message (which RabbitMQ still confirms) is a failure, as is a nack, a timeout
or a lost connection. Failures are retried with exponential backoff and jitter; rows
published but not acknowledged by central are published again after ``ack_timeout``.

Several rows due at once go in runs of up to ``publish_batch_max`` per message, a
``document_batch`` of their stored bytes (docs/protocol.md): broker and consumers pay
per message. A batch's confirm, or failure, is each of its rows'.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractExchange

from tillsync_protocol import BATCH_TYPE, CONTENT_TYPE, MAX_BATCH_SIZE, Backoff, topology
from tillsync_protocol.batch import batch_overhead, encode_batch

from .outbox import Outbox, OutboxRow, now_ms
from .settings import AgentSettings

__all__ = ["SendStats", "Sender"]

log = structlog.get_logger(__name__)


@dataclass
class SendStats:
    published: int = 0
    failed: int = 0
    last_success_at: int | None = None
    last_error: str | None = None
    errors: list[str] = field(default_factory=list)


class Sender:
    def __init__(self, settings: AgentSettings, outbox: Outbox) -> None:
        self._settings = settings
        self._outbox = outbox
        self._retry = Backoff(settings.retry_base_s, settings.retry_cap_s)
        self._user_id = settings.broker_user  # parses the URL: once, not per publish
        self.stats = SendStats()

    async def serve(
        self, exchange: AbstractExchange, closed: asyncio.Event, stopping: asyncio.Event
    ) -> None:
        """Publish until the connection closes or the agent stops; returns then.

        Everything still open is made due first: a reconnect or a start-up resends at once.
        """
        await self._outbox.make_due()
        try:
            while not closed.is_set() and not stopping.is_set():
                self._outbox.changed.clear()
                # Usually from memory: the rows submitted since the last round (take_due).
                rows = await self._outbox.take_due(self._settings.max_in_flight)
                if rows:
                    await self._publish(exchange, rows)
                    continue
                await _wait_any(
                    (self._outbox.changed, closed, stopping), timeout=await self._idle_timeout()
                )
        finally:
            # The publish records not written yet (Outbox.mark_published), before a stop.
            await self._outbox.close()

    async def _idle_timeout(self) -> float:
        next_due = await self._outbox.next_due_at()
        if next_due is None:
            return 3600.0
        return min(3600.0, max(0.01, (next_due - now_ms()) / 1000))

    async def _publish(self, exchange: AbstractExchange, rows: list[OutboxRow]) -> None:
        groups = _groups(rows, self._settings.publish_batch_max)
        outcomes = await asyncio.gather(
            *(self._publish_group(exchange, group) for group in groups), return_exceptions=True
        )
        # A batch stands or falls as one message: its outcome is each of its rows'.
        results = [outcome for group, outcome in zip(groups, outcomes, strict=True) for _ in group]
        now = now_ms()
        published: list[tuple[int, int]] = []
        failed: list[tuple[int, int]] = []
        connection_lost: BaseException | None = None
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, aiormq.spec.Basic.Ack):
                # Central's ack should come within ack_timeout; if not, publish again, backing off.
                wait = max(self._settings.ack_timeout_s, self._retry.delay(row.attempts))
                published.append((row.seq, now + int(wait * 1000)))
                continue
            failed.append((row.seq, now + int(self._retry.delay(row.attempts) * 1000)))
            reason = _describe(result)
            self.stats.last_error = reason
            if isinstance(result, (aiormq.exceptions.AMQPConnectionError, ConnectionError)):
                connection_lost = result
            log.warning(
                "publish failed",
                register_id=self._outbox.register_id,
                seq=row.seq,
                doc_id=row.doc_id,
                attempt=row.attempts + 1,
                error=reason,
            )
        if published:
            await self._outbox.mark_published(
                published, now, state={"last_successful_send_at": str(now)}
            )
            self.stats.published += len(published)
            self.stats.last_success_at = now
        if failed:
            await self._outbox.mark_failed(failed)
            self.stats.failed += len(failed)
            await self._outbox.set_state("last_error", self.stats.last_error)
        if connection_lost is not None:
            raise connection_lost

    async def _publish_group(self, exchange: AbstractExchange, rows: list[OutboxRow]) -> object:
        """One row as the document it is; several as one ``document_batch``."""
        if len(rows) == 1:
            row = rows[0]
            return await self._publish_message(exchange, row.payload, row.doc_id, row.doc_type)
        body = encode_batch([row.payload for row in rows])
        return await self._publish_message(exchange, body, str(uuid.uuid4()), BATCH_TYPE)

    async def _publish_message(
        self, exchange: AbstractExchange, body: bytes, message_id: str, kind: str
    ) -> object:
        """``kind`` is the AMQP ``type`` and the routing key's last part."""
        message = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            user_id=self._user_id,
            type=kind,
            app_id="tillsync-agent",
        )
        key = topology.document_key(self._outbox.center_id, self._outbox.register_id, kind)
        return await exchange.publish(
            message, key, mandatory=True, timeout=self._settings.publish_timeout_s
        )


ALONE_AFTER_ATTEMPTS = 3
"""A row published this many times without an ack goes in a message of its own: a document
that central cannot take (one that kills its worker, until the broker's delivery limit)
must not keep its batch-mates from being stored."""


def _groups(rows: list[OutboxRow], most: int) -> list[list[OutboxRow]]:
    """``rows`` cut, in order, into runs of at most ``most`` that fit one batch message;
    rows tried :data:`ALONE_AFTER_ATTEMPTS` times each alone."""
    groups: list[list[OutboxRow]] = []
    group: list[OutboxRow] = []
    size = 0
    for row in rows:
        grown = size + len(row.payload)
        alone = row.attempts >= ALONE_AFTER_ATTEMPTS or (
            bool(group) and group[-1].attempts >= ALONE_AFTER_ATTEMPTS
        )
        if group and (
            alone or len(group) >= most or grown + batch_overhead(len(group) + 1) > MAX_BATCH_SIZE
        ):
            groups.append(group)
            group, grown = [], len(row.payload)
        group.append(row)
        size = grown
    if group:
        groups.append(group)
    return groups


def _describe(result: object) -> str:
    if isinstance(result, aio_pika.exceptions.PublishError):
        return "unroutable: the broker returned the message (no queue bound for its key)"
    if isinstance(result, asyncio.TimeoutError):
        return "no confirm from the broker in time"
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    return f"unexpected publish result {result!r}"


async def _wait_any(events: tuple[asyncio.Event, ...], timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
