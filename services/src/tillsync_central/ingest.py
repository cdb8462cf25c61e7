"""The ingest workers: documents from ``tillsync.ingest`` into PostgreSQL, exactly once.

Per batch (:class:`IngestWorker`, any number competing on the quorum queue):

1. check every delivery, every document of a ``document_batch`` on its own
   (:func:`tillsync_central.intake.inspect_message`);
2. apply the batch in one transaction (:func:`tillsync_central.store.store`): new
   documents stored, repeats recognised by content hash, conflicts and refusals recorded;
   if PostgreSQL is unreachable the batch is kept and retried with capped backoff, never
   acknowledged and never dropped;
3. after COMMIT, publish one ack per register (publisher confirms, with a timeout);
4. then ``basic.ack`` the batch.

``register_state`` (a summary of ``documents``: best effort, never durable at COMMIT) is
moved on by a task of its own on a connection of its own (:class:`StateAdvancer`), off
the workers' loop: batches that commit while it writes are merged into its next write.

A crash between any two steps leaves the batch unacknowledged: the broker redelivers
it, step 2 finds duplicates, and step 3 acknowledges them again.

:class:`DeadLetterWorker` keeps what the broker dead-lettered after the delivery limit
(``tillsync.dead``) as dead letters with code ``delivery_limit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from prometheus_client import Histogram

from tillsync_protocol import Backoff, topology

from .acks import ack_messages
from .consumer import BatchConsumer, Session
from .db import connect
from .dead_letters import DeadLetter, insert_dead_letters, json_safe
from .intake import Delivery, inspect, inspect_message
from .settings import CentralSettings
from .store import ADVANCE_STATE, BatchResult, is_transient, store

__all__ = ["DeadLetterWorker", "IngestStats", "IngestWorker", "StateAdvancer", "delivery_of"]

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT_S = 10.0
STATE_CLOSE_TIMEOUT_S = 5.0
DB_RETRY_BASE_S = 0.2
DB_RETRY_CAP_S = 10.0


@dataclass
class IngestStats:
    """Counters of one process (all its workers), since it started."""

    batches: int = 0
    deliveries: int = 0
    documents: int = 0  # deliveries count a document_batch once, this each of its documents
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    refused: int = 0
    acks_published: int = 0
    dead_lettered_by_broker: int = 0
    db_retries: int = 0
    item_edits_applied: int = 0
    item_edits_refused: int = 0
    loyalty_posted: int = 0
    # Unregistered: whoever serves /metrics registers it in its own registry.
    batch_seconds: Histogram = field(default_factory=lambda: _batch_histogram())


def _batch_histogram() -> Histogram:
    return Histogram(
        "tillsync_ingest_batch_seconds",
        "Time from a batch's inspection to its acks published (transaction included).",
        buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        registry=None,
    )


def delivery_of(message: AbstractIncomingMessage) -> Delivery:
    """What ingest keeps of an AMQP delivery."""
    headers = json_safe(dict(message.headers or {}))
    return Delivery(
        body=bytes(message.body),
        routing_key=message.routing_key or "",
        user_id=message.user_id or None,
        message_id=message.message_id or None,
        headers=headers if isinstance(headers, dict) else {},
    )


class _DatabaseRetry:
    """Retries a database step while its failure is transient and the session lives."""

    def __init__(self, stats: IngestStats, consumer: str) -> None:
        self._backoff = Backoff(DB_RETRY_BASE_S, DB_RETRY_CAP_S)
        self._stats = stats
        self._consumer = consumer

    async def failed(self, exc: BaseException, session: Session, size: int) -> bool:
        """After a failure: wait before the next try; False if the batch must be given up."""
        if not is_transient(exc):
            raise exc
        delay = self._backoff.next()
        self._stats.db_retries += 1
        log.warning(
            "database unavailable, batch kept for retry",
            consumer=self._consumer,
            batch_size=size,
            retry_in_s=round(delay, 2),
            error=f"{type(exc).__name__}: {exc}",
        )
        return await session.pause_before_retry(delay)

    def succeeded(self) -> None:
        self._backoff.reset()


class IngestWorker(BatchConsumer):
    """One competing consumer of ``tillsync.ingest``."""

    queue_name = topology.INGEST_QUEUE

    def __init__(
        self,
        settings: CentralSettings,
        pool: asyncpg.Pool,
        *,
        index: int = 0,
        stats: IngestStats | None = None,
    ) -> None:
        super().__init__(
            settings.amqp_url.get_secret_value(),
            prefetch=settings.ingest_prefetch,
            batch_size=settings.ingest_batch_size,
            max_wait=settings.ingest_batch_max_wait_ms / 1000,
        )
        self.name = f"ingest-{index}"
        self._pool = pool
        self.stats = IngestStats() if stats is None else stats
        self._retry = _DatabaseRetry(self.stats, self.name)
        self._state = StateAdvancer(settings)

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            await super().run(stopping)
        finally:
            await self._state.close()

    async def handle(self, batch: Sequence[AbstractIncomingMessage], session: Session) -> bool:
        started = time.perf_counter()
        inspections = [
            inspection for message in batch for inspection in inspect_message(delivery_of(message))
        ]
        inspected = time.perf_counter()
        while True:
            try:
                result = await store(self._pool, inspections, advance=False)
                break
            except Exception as exc:
                if not await self._retry.failed(exc, session, len(batch)):
                    return False
        self._retry.succeeded()
        stored = time.perf_counter()
        exchange = await session.publish_channel.get_exchange(
            topology.REGISTERS_EXCHANGE, ensure=False
        )
        await self._publish_acks(exchange, result)
        acked = time.perf_counter()
        # A summary off the documents' way back and off this loop: the registers have
        # their acks already, and the next batch need not wait for it.
        self._state.note(result.stored_through)
        self.stats.batch_seconds.observe(acked - started)
        timings = {
            "inspect_ms": round((inspected - started) * 1000, 2),
            "store_ms": round((stored - inspected) * 1000, 2),
            "acks_ms": round((acked - stored) * 1000, 2),
        }
        self._count(len(batch), len(inspections), result, timings)
        return True

    async def _publish_acks(self, exchange: AbstractExchange, result: BatchResult) -> None:
        publishes = [
            exchange.publish(message, key, timeout=PUBLISH_TIMEOUT_S)
            for message, key in ack_messages(result)
        ]
        # Any failure raises: the session ends and the batch is redelivered and re-acked.
        await asyncio.gather(*publishes)
        self.stats.acks_published += len(publishes)

    def _count(
        self, size: int, documents: int, result: BatchResult, timings: dict[str, float]
    ) -> None:
        stats = self.stats
        stats.batches += 1
        stats.deliveries += size
        stats.documents += documents
        stats.stored += result.stored
        stats.duplicates += result.duplicates
        stats.conflicts += result.conflicts
        stats.refused += result.refused
        stats.item_edits_applied += result.item_edits_applied
        stats.item_edits_refused += result.item_edits_refused
        stats.loyalty_posted += result.loyalty_posted
        log.info(
            "batch committed",
            consumer=self.name,
            size=size,
            documents=documents,
            stored=result.stored,
            duplicates=result.duplicates,
            conflicts=result.conflicts,
            refused=result.refused,
            item_edits_applied=result.item_edits_applied,
            item_edits_refused=result.item_edits_refused,
            loyalty_posted=result.loyalty_posted,
            stock_lines=result.stock_lines,
            **timings,
        )


_STATE_SESSION = {
    "synchronous_commit": "off",
    "application_name": "tillsync-central register_state",  # in pg_stat_activity
}


class StateAdvancer:
    """Moves ``register_state`` on in the background, on a connection of its own.

    What batches stored is merged (the greatest seq per register) while a write is under
    way and written by the next one, so a burst of batches costs one statement and no
    batch waits for it. The connection's session has ``synchronous_commit`` off and runs
    nothing else, so a write is one round trip: one statement, its own transaction, no
    BEGIN, no COMMIT, no pool reset (four round trips more through the pool). A write
    that fails is logged and not retried, and the connection is opened again for the
    next: the register's next batch and the reconciler move the row on anyway.
    """

    def __init__(self, settings: CentralSettings) -> None:
        self._settings = settings
        self._conn: asyncpg.Connection | None = None
        self._pending: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self.writes = 0
        """Writes attempted so far (each one for every batch noted while it waited)."""

    def note(self, stored_through: dict[str, int]) -> None:
        pending = self._pending
        for register_id, seq in stored_through.items():
            if seq > pending.get(register_id, 0):
                pending[register_id] = seq
        if pending and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._write(), name="register-state")

    async def _write(self) -> None:
        while self._pending:
            taken, self._pending = self._pending, {}
            self.writes += 1
            registers = sorted(taken)
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await connect(self._settings, server_settings=_STATE_SESSION)
                await self._conn.execute(ADVANCE_STATE, registers, [taken[r] for r in registers])
            except Exception as exc:
                log.warning("register_state not advanced", registers=registers, error=repr(exc))
                await self._drop_connection()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except (TimeoutError, Exception):
                conn.terminate()

    async def close(self, timeout: float = STATE_CLOSE_TIMEOUT_S) -> None:
        """Write what was noted (on stop), for at most ``timeout`` seconds (a summary is
        not worth holding a stop for: a write still waiting then is given up and logged),
        then close the connection."""
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                log.warning(
                    "register_state not advanced",
                    registers=sorted(self._pending),
                    error=f"still writing after {timeout} s on stop",
                )
        await self._drop_connection()


class DeadLetterWorker(BatchConsumer):
    """Keeps what the broker dead-lettered (``tillsync.dead``) as dead letters."""

    queue_name = topology.DEAD_LETTER_QUEUE

    def __init__(
        self, settings: CentralSettings, pool: asyncpg.Pool, *, stats: IngestStats | None = None
    ) -> None:
        super().__init__(
            settings.amqp_url.get_secret_value(), prefetch=200, batch_size=100, max_wait=0.05
        )
        self.name = "dead-letters"
        self._pool = pool
        self.stats = IngestStats() if stats is None else stats
        self._retry = _DatabaseRetry(self.stats, self.name)

    async def handle(self, batch: Sequence[AbstractIncomingMessage], session: Session) -> bool:
        letters = [_broker_dead_letter(message) for message in batch]
        while True:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await insert_dead_letters(conn, letters)
                break
            except Exception as exc:
                if not await self._retry.failed(exc, session, len(batch)):
                    return False
        self._retry.succeeded()
        self.stats.dead_lettered_by_broker += len(batch)
        for letter in letters:
            log.warning(
                "dead-lettered by the broker",
                register_id=letter.register_id,
                seq=letter.seq,
                doc_id=letter.message_id,
                reason=letter.reason,
            )
        return True


def _broker_dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    delivery = delivery_of(message)
    deaths = delivery.headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    routing_keys = death.get("routing-keys")
    routing_key = routing_keys[0] if isinstance(routing_keys, list) and routing_keys else None
    inspection = inspect(delivery)
    reason = (
        f"the broker gave up on it in {death.get('queue', '?')} "
        f"(reason {death.get('reason', '?')}, count {death.get('count', '?')})"
    )
    return DeadLetter(
        source="dlx",
        code="delivery_limit",
        field="",
        reason=reason,
        payload=delivery.body,
        routing_key=routing_key or delivery.routing_key,
        user_id=delivery.user_id,
        message_id=delivery.message_id,
        register_id=inspection.register_id,
        seq=inspection.seq,
        headers=delivery.headers,
    )
