"""The live feed behind ``GET /api/events`` (server-sent events): new receipts and other
documents, registers going offline (and back online), new dead letters.

One :class:`LiveFeed` per app polls PostgreSQL once a second (three indexed queries,
whatever the number of browsers) and fans each event out to every subscriber's bounded
queue; a subscriber that falls behind loses its oldest events, never slows the others.
Documents are found by ``received_at`` with a few seconds of overlap (a transaction that
commits late carries an earlier ``now()``), deduplicated by ``(register_id, seq)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog

from ..store import is_transient
from .display import format_money

__all__ = ["KEEPALIVE_S", "LiveFeed", "Subscriber", "sse_frames"]

log = structlog.get_logger(__name__)

KEEPALIVE_S = 15.0
POLL_S = 1.0
QUEUE_SIZE = 500
_OVERLAP = timedelta(seconds=5)
_SEEN = 10_000

_DOCUMENTS = """
SELECT d.register_id, d.seq, d.center_id, d.doc_type, d.created_at, d.received_at,
       r.receipt_no, r.currency, r.total
FROM documents d LEFT JOIN receipts r USING (register_id, seq)
WHERE d.received_at > $1 ORDER BY d.received_at LIMIT 500
"""
_PRESENCE = """
SELECT p.register_id, r.center_id, p.last_seen, p.pending,
       p.last_seen >= now() - make_interval(secs => $1) AS online
FROM register_presence p JOIN registers r USING (register_id)
WHERE r.revoked_at IS NULL
"""
_DEAD_LETTERS = """
SELECT id, received_at, source, code, field, reason, register_id, seq
FROM dead_letters WHERE id > $1 ORDER BY id LIMIT 500
"""
_START = "SELECT now(), coalesce((SELECT max(id) FROM dead_letters), 0)"


class Subscriber:
    """One event-stream client: a bounded queue that drops its oldest events."""

    def __init__(self, maxsize: int = QUEUE_SIZE) -> None:
        self.events: deque[tuple[str, dict[str, Any]]] = deque(maxlen=maxsize)
        self.ready = asyncio.Event()
        self.closed = False

    def push(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((name, data))
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()


def _jsonable(row: asyncpg.Record) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in dict(row).items()}


class LiveFeed:
    """Polls for what changed and tells every subscriber."""

    def __init__(self, pool: asyncpg.Pool, offline_after_s: float) -> None:
        self._pool = pool
        self._offline_after_s = float(offline_after_s)
        self.subscribers: set[Subscriber] = set()
        self._since: datetime | None = None
        self._last_letter = 0
        self._online: dict[str, bool] = {}
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber()
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def _publish(self, name: str, data: dict[str, Any]) -> None:
        for subscriber in list(self.subscribers):
            subscriber.push(name, data)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.poll()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("live feed poll failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), POLL_S)
        for subscriber in list(self.subscribers):
            subscriber.close()

    async def poll(self) -> None:
        """One round: the first only takes the starting point (and who is online)."""
        async with self._pool.acquire() as conn:
            first = self._since is None
            if first:
                start = await conn.fetchrow(_START)
                assert start is not None
                self._since, self._last_letter = start[0], int(start[1])
            assert self._since is not None
            documents = await conn.fetch(_DOCUMENTS, self._since - _OVERLAP)
            presence = await conn.fetch(_PRESENCE, self._offline_after_s)
            letters = await conn.fetch(_DEAD_LETTERS, self._last_letter)
        for row in documents:
            key = (row["register_id"], row["seq"])
            self._since = max(self._since, row["received_at"])
            if key in self._seen:
                continue
            self._seen[key] = None
            if len(self._seen) > _SEEN:
                self._seen.popitem(last=False)
            if not first:
                event = _jsonable(row)
                event["total_display"] = format_money(row["total"], row["currency"])
                self._publish("document", event)
        for row in presence:
            online = bool(row["online"])
            before = self._online.get(row["register_id"])
            self._online[row["register_id"]] = online
            if not first and before is not None and before != online:
                self._publish("offline" if not online else "online", _jsonable(row))
        for row in letters:
            self._last_letter = max(self._last_letter, row["id"])
            if not first:
                self._publish("dead_letter", _jsonable(row))


async def sse_frames(
    feed: LiveFeed, subscriber: Subscriber, keepalive_s: float = KEEPALIVE_S
) -> AsyncIterator[str]:
    """The ``text/event-stream`` of one client, until the feed stops or it disconnects."""
    number = 0
    try:
        yield "retry: 3000\n\n" + _frame(number, "ready", {"subscribers": len(feed.subscribers)})
        while not subscriber.closed:
            if not subscriber.events:
                subscriber.ready.clear()
                try:
                    await asyncio.wait_for(subscriber.ready.wait(), keepalive_s)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
            while subscriber.events:
                number += 1
                yield _frame(number, *subscriber.events.popleft())
    finally:
        feed.unsubscribe(subscriber)


def _frame(number: int, name: str, data: dict[str, Any]) -> str:
    return f"id: {number}\nevent: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
