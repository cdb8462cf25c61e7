"""A batch consumer of one queue, with its own connection and reconnect loop.

The loop every central queue worker shares: connect (with a timeout), open a consuming
channel (prefetch) and a publishing channel (publisher confirms), collect deliveries into
batches (up to ``batch_size``; an idle worker waits at most ``max_wait`` after the first
delivery for more, a busy one takes what is waiting), hand each
batch to :meth:`BatchConsumer.handle`, and ``basic.ack`` the batch only when it returns
True. Anything else leaves the batch unacknowledged: when the channel or the process
dies, the broker delivers it again, and the handlers are idempotent.

We own reconnection (no aio-pika robust connection, whose publishes can hang while
disconnected): a lost connection ends the session, and the loop reconnects with capped
backoff until ``stopping`` is set. On ``stopping``: cancel the consumer, handle what was
already delivered for at most ``drain_timeout`` seconds, then close; what is left is
redelivered to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.connection import make_url

from tillsync_protocol import Backoff

__all__ = ["BatchConsumer", "Session", "connect_amqp", "wait_any"]

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 5.0


@dataclass
class Session:
    """One connection's channels, as a handler sees them."""

    connection: AbstractConnection
    publish_channel: AbstractChannel
    closed: asyncio.Event
    """Set when the connection or a channel closed: the batch in hand will be redelivered."""
    stopping: asyncio.Event
    give_up_at: float | None = None
    """While draining on stop: the loop time after which a handler should stop retrying."""

    def should_abandon(self) -> bool:
        if self.closed.is_set():
            return True
        if self.give_up_at is not None:
            return asyncio.get_running_loop().time() >= self.give_up_at
        return self.stopping.is_set()

    async def pause_before_retry(self, delay: float) -> bool:
        """Wait ``delay`` before retrying the current batch (the database is away);
        False if the batch must be given up instead (the channel closed, or the drain
        time on stop ran out)."""
        if self.should_abandon():
            return False
        interrupted = await wait_any((self.closed, self.stopping), delay)
        return not (interrupted and self.should_abandon())


class BatchConsumer(ABC):
    """Subclasses name the queue and implement :meth:`handle`."""

    queue_name: str
    name: str

    def __init__(
        self,
        amqp_url: str,
        *,
        prefetch: int,
        batch_size: int,
        max_wait: float,
        drain_timeout: float = 10.0,
        reconnect_base: float = 0.5,
        reconnect_cap: float = 30.0,
    ) -> None:
        self._amqp_url = amqp_url
        self._prefetch = prefetch
        self._batch_size = batch_size
        self._max_wait = max_wait
        self._drain_timeout = drain_timeout
        self._backoff = Backoff(reconnect_base, reconnect_cap)
        self.connected = asyncio.Event()
        """Set while consuming (tests and the runner wait on it)."""

    @abstractmethod
    async def handle(self, batch: Sequence[AbstractIncomingMessage], session: Session) -> bool:
        """Process a batch; True to acknowledge it all, False to abandon it (redelivery).

        May raise: the session ends and the batch is redelivered."""

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until ``stopping`` is set; reconnects on its own; never busy-loops."""
        while not stopping.is_set():
            try:
                await self._session(stopping)
            except (TimeoutError, Exception) as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.warning("consumer session ended", consumer=self.name, error=error)
            self.connected.clear()
            if stopping.is_set():
                break
            await wait_any((stopping,), self._backoff.next())
        log.info("consumer stopped", consumer=self.name)

    async def _session(self, stopping: asyncio.Event) -> None:
        connection = await connect_amqp(self._amqp_url, f"tillsync-central {self.name}")
        closed = asyncio.Event()
        connection.close_callbacks.add(lambda *_: closed.set())
        try:
            consume_channel = await connection.channel(publisher_confirms=False)
            consume_channel.close_callbacks.add(lambda *_: closed.set())
            publish_channel = await connection.channel(publisher_confirms=True)
            publish_channel.close_callbacks.add(lambda *_: closed.set())
            await consume_channel.set_qos(prefetch_count=self._prefetch)
            queue = await consume_channel.get_queue(self.queue_name, ensure=False)
            inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            tag = await queue.consume(inbox.put, no_ack=False)
            session = Session(connection, publish_channel, closed, stopping)
            self._backoff.reset()
            self.connected.set()
            log.info("consuming", consumer=self.name, queue=self.queue_name)
            while not stopping.is_set() and not closed.is_set():
                batch = await self._collect(inbox, session)
                if batch and not await self._settle(batch, session):
                    return
            if closed.is_set():
                raise ConnectionError("connection or channel closed by the broker")
            await asyncio.wait_for(queue.cancel(tag), timeout=CLOSE_TIMEOUT_S)
            await self._drain(inbox, session)
        finally:
            self.connected.clear()
            try:
                await asyncio.wait_for(connection.close(), timeout=CLOSE_TIMEOUT_S)
            except (TimeoutError, Exception):
                pass  # closing a dead connection: the broker requeues without us

    async def _drain(self, inbox: asyncio.Queue[AbstractIncomingMessage], session: Session) -> None:
        """After the consumer is cancelled: handle what was already delivered, in time."""
        session.give_up_at = asyncio.get_running_loop().time() + self._drain_timeout
        while not inbox.empty() and not session.should_abandon():
            batch = [inbox.get_nowait() for _ in range(min(self._batch_size, inbox.qsize()))]
            if not await self._settle(batch, session):
                break
        if not inbox.empty():
            log.info("left for redelivery", consumer=self.name, deliveries=inbox.qsize())

    async def _settle(self, batch: list[AbstractIncomingMessage], session: Session) -> bool:
        if not await self.handle(batch, session):
            log.info("batch abandoned for redelivery", consumer=self.name, size=len(batch))
            return False
        # Batches are handled in delivery order, one at a time: every earlier tag is
        # already settled, so one multiple-ack covers exactly this batch.
        await batch[-1].ack(multiple=True)
        return True

    async def _collect(
        self, inbox: asyncio.Queue[AbstractIncomingMessage], session: Session
    ) -> list[AbstractIncomingMessage]:
        """The next batch. The wait of up to ``max_wait`` for more is for an idle worker
        that just got a first delivery: deliveries that arrived while the previous batch
        was handled have waited a batch's time already, so they go at once, with
        whatever else is there (docs/performance.md, tenth session)."""
        loop = asyncio.get_running_loop()
        batch: list[AbstractIncomingMessage] = []
        idle = inbox.empty()
        while not batch:
            if session.stopping.is_set() or session.closed.is_set():
                return batch
            try:
                batch.append(await asyncio.wait_for(inbox.get(), timeout=0.25))
            except TimeoutError:
                continue
        deadline = loop.time() + (self._max_wait if idle else 0.0)
        while len(batch) < self._batch_size:
            if not inbox.empty():
                batch.append(inbox.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(inbox.get(), timeout=remaining))
            except TimeoutError:
                break
        return batch


async def connect_amqp(url: str, name: str) -> AbstractConnection:
    """``aio_pika.connect`` (named ``name`` in the broker's UI), except that a connection
    that fails or times out on its way up is closed here. aio-pika leaves it to the
    garbage collector, which closes it later, or warns that ``Connection.close`` was never
    awaited when no event loop is running then. (The agent's link does the same.)"""
    connection = aio_pika.Connection(make_url(url), client_properties={"connection_name": name})
    try:
        await asyncio.wait_for(
            connection.connect(timeout=CONNECT_TIMEOUT_S), timeout=CONNECT_TIMEOUT_S + 1
        )
    except BaseException:
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(connection.close(), timeout=CLOSE_TIMEOUT_S)
        raise
    return connection


async def wait_any(events: Sequence[asyncio.Event], timeout: float) -> bool:
    """Wait until one of ``events`` is set or ``timeout`` passes; True if one was set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
