"""Heartbeats: every ``heartbeat_interval_s`` while connected, the register tells central
how it stands (pending, rejected, acknowledged, last seq, catalog cursors, version, last
sync, last error) on ``tillsync.presence`` with key ``hb.<center>.<register>``.

A heartbeat is worth nothing once the next one is due, so it is *not* persistent, it
expires in the broker after three intervals, and a failed one is logged and forgotten:
the next one carries the same news. It is published on the link's publish channel
(confirmed, like documents) from its own task, so a slow confirm never holds the sender.

Each wait is drawn between 80 % and 100 % of the interval: never later than the interval
(central's presence counts on that), and registers that came up together (a fleet after
a broker restart) drift apart instead of beating in the same second forever.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange

from tillsync_protocol import (
    CONTENT_TYPE,
    Heartbeat,
    HeartbeatBody,
    SyncSummary,
    encode,
    topology,
)

from . import __version__
from .history import History, SyncRun
from .outbox import Outbox, now_ms
from .replica import Replica
from .settings import AgentSettings

__all__ = ["HeartbeatStats", "Heartbeats", "summary_of"]

log = structlog.get_logger(__name__)

MAX_ERROR_CHARS = 1000
"""The protocol's ``Text`` limit: a longer last error is cut."""
JITTER = 0.2
"""A wait is the interval less up to this share of it, at random."""


@dataclass
class HeartbeatStats:
    sent: int = 0
    failed: int = 0
    last_sent_at: int | None = None
    last_error: str | None = None


def summary_of(run: SyncRun | None) -> SyncSummary | None:
    """The heartbeat's summary of a finished sync run (None if none finished yet)."""
    if run is None or run.finished_at is None or run.result is None:
        return None
    return SyncSummary.model_validate(
        {
            "kind": run.kind,
            "result": run.result,
            "started_at": run.started_at,
            "finished_at": max(run.finished_at, run.started_at),
            "sent": run.sent,
            "received": run.received,
            "errors": len(run.errors),
        }
    )


class Heartbeats:
    """Publishes one heartbeat right after every connect, then one per interval."""

    def __init__(
        self,
        settings: AgentSettings,
        outbox: Outbox,
        replica: Replica,
        history: History,
        *,
        exchange: Callable[[], AbstractExchange | None],
        last_error: Callable[[], str | None],
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._rng = rng or random.Random()
        self._outbox = outbox
        self._replica = replica
        self._history = history
        self._exchange = exchange
        self._last_error = last_error
        self._wake = asyncio.Event()
        self.stats = HeartbeatStats()

    def link_up(self) -> None:
        """Beat now: central learns at once that the register is back."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Beat until ``stopping``; skips beats while the link is down."""
        while not stopping.is_set():
            waiters = [asyncio.ensure_future(e.wait()) for e in (self._wake, stopping)]
            try:
                await asyncio.wait(
                    waiters, timeout=self.next_wait(), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
            self._wake.clear()
            exchange = self._exchange()
            if exchange is not None and not stopping.is_set():
                await self.beat(exchange)

    def next_wait(self) -> float:
        """Seconds until the next beat: within the last fifth of the interval."""
        return self._settings.heartbeat_interval_s * (1 - JITTER * self._rng.random())

    async def body(self) -> HeartbeatBody:
        counts = self._outbox.counts
        error = self._last_error()
        return HeartbeatBody(
            register_id=self._settings.register_id,
            center_id=self._settings.center_id,
            agent_version=__version__,
            pending=counts.pending,
            rejected=counts.rejected,
            acknowledged=counts.acknowledged,
            last_seq=counts.last_seq,
            cursors=await self._replica.reported_cursors(),
            last_sync=summary_of(self._history.last),
            last_error=None if error is None else error[:MAX_ERROR_CHARS],
        )

    async def beat(self, exchange: AbstractExchange) -> bool:
        """Publish one heartbeat; True if the broker confirmed it. Never raises (but
        cancellation)."""
        settings = self._settings
        try:
            heartbeat = Heartbeat(
                msg_id=str(uuid.uuid4()), created_at=now_ms(), body=await self.body()
            )
            message = aio_pika.Message(
                encode(heartbeat),
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                message_id=heartbeat.msg_id,
                user_id=settings.broker_user,
                type=heartbeat.type,
                app_id="tillsync-agent",
                expiration=3 * settings.heartbeat_interval_s,
            )
            await exchange.publish(
                message,
                topology.presence_key(settings.center_id, settings.register_id),
                timeout=settings.publish_timeout_s,
            )
        except (TimeoutError, Exception) as exc:
            self.stats.failed += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "heartbeat not sent",
                register_id=settings.register_id,
                error=self.stats.last_error,
            )
            return False
        self.stats.sent += 1
        self.stats.last_sent_at = now_ms()
        log.debug(
            "heartbeat sent",
            register_id=settings.register_id,
            pending=heartbeat.body.pending,
            last_seq=heartbeat.body.last_seq,
        )
        return True
