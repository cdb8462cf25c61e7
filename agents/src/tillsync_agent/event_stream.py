"""Server-sent events for the local API's ``GET /v1/events``: one bounded queue per client
and the ``text/event-stream`` it reads.

A client that falls more than ``maxsize`` events behind loses the *oldest* ones and is told
how many with a ``dropped`` event (then it re-reads what it shows), so a slow or stuck
client never slows the agent or grows its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["KEEPALIVE_S", "EventQueue", "event_stream"]

KEEPALIVE_S = 15.0
"""A comment line on every idle event stream this often (proxies, dead-client detection)."""


class EventQueue:
    """One event-stream client's bounded queue: past ``maxsize`` the oldest event is
    dropped and counted, so a slow client never slows the agent."""

    def __init__(self, maxsize: int) -> None:
        self._events: deque[tuple[str, dict[str, Any]]] = deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = 0

    def push(self, name: str, data: dict[str, Any]) -> None:
        if len(self._events) >= self._maxsize:
            self._events.popleft()
            self.dropped += 1
        self._events.append((name, data))
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        """The next event; None after ``timeout`` idle seconds or once closed."""
        if not self._events and not self.closed:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        return self._events.popleft() if self._events and not self.closed else None


async def event_stream(
    queue: EventQueue, ready: dict[str, Any], keepalive_s: float, close: Callable[[], None]
) -> AsyncIterator[str]:
    """The ``text/event-stream`` of one client: ``ready``, then ``catalog``, ``sync`` and
    ``dropped`` events, a comment when idle; ends when the agent stops."""
    try:
        yield "retry: 3000\n\n" + _frame(0, "ready", ready)
        number = 0
        reported_drops = 0
        while not queue.closed:
            item = await queue.next(keepalive_s)
            if queue.dropped > reported_drops:
                number += 1
                yield _frame(number, "dropped", {"count": queue.dropped - reported_drops})
                reported_drops = queue.dropped
            if item is None:
                if not queue.closed:
                    yield ": keepalive\n\n"
                continue
            number += 1
            yield _frame(number, *item)
    finally:
        close()


def _frame(number: int, name: str, data: dict[str, Any]) -> str:
    return f"id: {number}\nevent: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
