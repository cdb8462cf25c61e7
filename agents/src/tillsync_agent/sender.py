"""The sender: publishes due outbox rows in seq order, many in flight, with confirms.

A row counts as published only on a real ``Basic.Ack`` for a *routed* message: the
channel is opened with ``on_return_raises`` and every publish is ``mandatory``, so an
unroutable message (which RabbitMQ still confirms) is a failure, as is a nack, a timeout
or a lost connection. Failures are retried with exponential backoff and jitter; rows
published but not acknowledged by central are published again after ``ack_timeout``.

The window is continuous: a row is published as soon as it is due and there is room
(``max_in_flight``), not in rounds that wait for the slowest confirm of the previous one.
Rows in flight are known in memory and left out of the due query, so nothing is published
twice while its confirm is outstanding. Confirms are recorded in the outbox by a separate
task, whatever has been settled since its last transaction in one more: recording is off
the publishing path and costs one SQLite transaction per burst, not per document.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel

from tillsync_protocol import CONTENT_TYPE, Backoff, topology

from .outbox import Outbox, OutboxRow, now_ms
from .settings import AgentSettings

__all__ = ["SendStats", "Sender"]

log = structlog.get_logger(__name__)

PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
RECORD_LINGER_S = 0.02
"""How long the recorder lets confirms gather before one transaction records them."""
RESEND_CHECK_S = 1.0
"""Under a steady backlog, how often the sender looks for rows due again (resends)."""


@dataclass
class SendStats:
    published: int = 0
    failed: int = 0
    last_success_at: int | None = None
    last_error: str | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class _Window:
    """What one connection's sender has in flight, and what has settled since the last
    record."""

    size: int
    in_flight: set[int] = field(default_factory=set)
    """Seqs being published, or confirmed (or failed) but not yet recorded."""
    settled: list[tuple[OutboxRow, object, int]] = field(default_factory=list)
    """``(row, publish result, when)`` waiting to be recorded."""
    has_settled: asyncio.Event = field(default_factory=asyncio.Event)
    has_room: asyncio.Event = field(default_factory=asyncio.Event)
    publishing: int = 0
    """Publish tasks not yet settled."""
    connection_lost: BaseException | None = None

    @property
    def free(self) -> int:
        return self.size - len(self.in_flight)


class Sender:
    def __init__(self, settings: AgentSettings, outbox: Outbox) -> None:
        self._settings = settings
        self._outbox = outbox
        self._retry = Backoff(settings.retry_base_s, settings.retry_cap_s)
        self._user_id = settings.broker_user  # parsed from the URL once, not per publish
        self.stats = SendStats()

    async def serve(
        self, channel: AbstractChannel, closed: asyncio.Event, stopping: asyncio.Event
    ) -> None:
        """Publish until the connection closes or the agent stops; returns then, after the
        publishes in flight have settled and been recorded (raises if the connection was
        lost).

        Everything still open is made due first: a reconnect or a start-up resends at once.
        """
        await self._outbox.make_due()
        window = _Window(self._settings.max_in_flight)
        done = asyncio.Event()
        # aio-pika's publish holds the channel's lock until each message's frames are
        # written, one message at a time; on aiormq's channel (which keeps the
        # returns-raise setting) with wait=False the window's messages go out back to
        # back. Same confirms, same timeout; returns and nacks still raise.
        underlay = await channel.get_underlay_channel()
        if not isinstance(underlay, aiormq.Channel):  # what aio-pika always has underneath
            raise TypeError(f"unexpected channel {underlay!r}")
        try:
            async with asyncio.TaskGroup() as group:
                recorder = group.create_task(self._record(window, done))
                try:
                    await self._feed(underlay, window, group, closed, stopping, recorder)
                finally:
                    done.set()
                    window.has_settled.set()
        except BaseExceptionGroup as errors:
            # The link reports and retries one error (a database failure, say), not a group.
            raise errors.exceptions[0] from None
        if window.connection_lost is not None:
            raise window.connection_lost

    async def _feed(
        self,
        channel: aiormq.Channel,
        window: _Window,
        group: asyncio.TaskGroup,
        closed: asyncio.Event,
        stopping: asyncio.Event,
        recorder: asyncio.Task[None],
    ) -> None:
        """Start a publish for every due row while there is room in the window.

        New rows are read past the last seq taken (``taken_through``); rows taken before
        and due again (failed, unacknowledged past their timeout, made due by a sweep, a
        shift close or central's resend request) are looked for whenever the sender has
        caught up with new rows, and at least every second under a steady backlog.
        """
        loop = asyncio.get_running_loop()
        first_open = await self._outbox.first_open()
        taken_through = self._outbox.counts.last_seq if first_open is None else first_open - 1
        caught_up = True
        resends_checked = loop.time()
        while not closed.is_set() and not stopping.is_set() and not recorder.done():
            if window.free <= 0:
                window.has_room.clear()
                await _wait_any((window.has_room, closed, stopping), timeout=1.0)
                continue
            self._outbox.changed.clear()
            resends = caught_up or loop.time() - resends_checked >= RESEND_CHECK_S
            if resends:
                resends_checked = loop.time()
            free = window.free
            rows, new, next_due = await self._outbox.sendable(
                free, after=taken_through, in_flight=window.in_flight, resends=resends
            )
            caught_up = len(rows) < free
            for row in rows:
                window.in_flight.add(row.seq)
                window.publishing += 1
                group.create_task(self._publish_one(channel, row, window))
            if new:
                taken_through = rows[-1].seq
            if not rows:
                await _wait_any((self._outbox.changed, closed, stopping), timeout=_idle(next_due))

    async def _publish_one(self, channel: aiormq.Channel, row: OutboxRow, window: _Window) -> None:
        properties = aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=row.doc_id,
            user_id=self._user_id,
            message_type=row.doc_type,
            app_id="tillsync-agent",
        )
        key = topology.document_key(self._outbox.center_id, self._outbox.register_id, row.doc_type)
        result: object
        try:
            result = await channel.basic_publish(
                row.payload,
                exchange=topology.DOCS_EXCHANGE,
                routing_key=key,
                properties=properties,
                mandatory=True,
                timeout=self._settings.publish_timeout_s,
                wait=False,
            )
        except Exception as exc:  # every failure is the row's result, recorded below
            result = exc
        finally:
            window.publishing -= 1
        window.settled.append((row, result, now_ms()))
        window.has_settled.set()

    async def _record(self, window: _Window, done: asyncio.Event) -> None:
        """Record settled publishes in the outbox, a burst per transaction, until the feed
        is done and nothing is in flight."""
        while True:
            await window.has_settled.wait()
            if not done.is_set() and window.free > 0:
                # Let confirms gather: one transaction for many (nothing waits on a record
                # but a full window, and rows in flight are never read as due).
                await asyncio.sleep(RECORD_LINGER_S)
            window.has_settled.clear()
            if window.settled:
                batch, window.settled = window.settled, []
                lost = await self._record_batch(batch)
                window.connection_lost = window.connection_lost or lost
                for row, _, _ in batch:
                    window.in_flight.discard(row.seq)
                window.has_room.set()
            if done.is_set() and window.publishing == 0 and not window.settled:
                break

    async def _record_batch(
        self, batch: list[tuple[OutboxRow, object, int]]
    ) -> BaseException | None:
        published: list[tuple[int, int, int]] = []
        failed: list[tuple[int, int]] = []
        connection_lost: BaseException | None = None
        for row, result, at in batch:
            if isinstance(result, aiormq.spec.Basic.Ack):
                # Central's ack should come within ack_timeout; if not, publish again, backing off.
                wait = max(self._settings.ack_timeout_s, self._retry.delay(row.attempts))
                published.append((row.seq, at, at + int(wait * 1000)))
                continue
            failed.append((row.seq, at + int(self._retry.delay(row.attempts) * 1000)))
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
        state: dict[str, str | None] = {}
        if published:
            last = max(at for _, at, _ in published)
            state["last_successful_send_at"] = str(last)
            self.stats.published += len(published)
            self.stats.last_success_at = last
        if failed:
            state["last_error"] = self.stats.last_error
            self.stats.failed += len(failed)
        await self._outbox.record_sends(published, failed, state)
        return connection_lost


def _idle(next_due: int | None) -> float:
    """Seconds to wait for a change when nothing is due now."""
    if next_due is None:
        return 3600.0
    return min(3600.0, max(0.01, (next_due - now_ms()) / 1000))


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
