"""Change notifications of the catalog replica, for POS apps embedding the agent.

``async for event in agent.catalog_changes(): ...`` gets every change committed to the
replica after it subscribed; each subscriber has its own bounded queue, and one that falls
behind loses the *oldest* events (counted in :attr:`CatalogSubscription.dropped`) rather
than slowing the agent down. ``agent.on_change(callback)`` calls ``callback(event)`` right
after each commit instead.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

__all__ = ["CatalogEvent", "CatalogEvents", "CatalogSubscription", "EventSource"]

log = structlog.get_logger(__name__)

EventSource = Literal["change", "delta", "reinit", "local_edit"]


@dataclass(frozen=True)
class CatalogEvent:
    """One committed change of the replica.

    ``op`` is ``upsert`` or ``delete`` for one row, or ``reload`` (``key`` None) when a
    replace swapped in the whole of ``entity``. ``source`` says what wrote it: a real-time
    ``change``, a ``delta``, a ``reinit`` or this register's own ``local_edit``.
    """

    entity: str
    key: str | None
    scope: str
    op: Literal["upsert", "delete", "reload"]
    version: int | None
    source: EventSource


class CatalogSubscription:
    """An async iterator of :class:`CatalogEvent`; ends when the agent closes or on
    :meth:`close`."""

    def __init__(self, maxsize: int) -> None:
        self._events: deque[CatalogEvent] = deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0
        """Events lost because this subscriber fell more than ``maxsize`` behind."""

    def _push(self, event: CatalogEvent) -> None:
        if self._closed:
            return
        if len(self._events) >= self._maxsize:
            self._events.popleft()
            self.dropped += 1
        self._events.append(event)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def pending(self) -> int:
        """Events queued and not yet read."""
        return len(self._events)

    def __aiter__(self) -> CatalogSubscription:
        return self

    async def __anext__(self) -> CatalogEvent:
        while not self._events:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()


class CatalogEvents:
    """The hub: the replica publishes after each commit, subscribers receive."""

    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        # Weak: a subscriber that breaks out of its ``async for`` and drops the iterator
        # unsubscribes by being collected.
        self._subscriptions: weakref.WeakSet[CatalogSubscription] = weakref.WeakSet()
        self._callbacks: list[Callable[[CatalogEvent], None]] = []

    def subscribe(self, maxsize: int | None = None) -> CatalogSubscription:
        subscription = CatalogSubscription(maxsize or self._queue_size)
        self._subscriptions.add(subscription)
        return subscription

    def on_change(self, callback: Callable[[CatalogEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` after every commit; returns a function that unsubscribes."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def publish(self, events: list[CatalogEvent]) -> None:
        for subscription in list(self._subscriptions):
            for event in events:
                subscription._push(event)
        for callback in list(self._callbacks):
            for event in events:
                try:
                    callback(event)
                except Exception as exc:  # a POS app's bug must not stop the replica
                    log.error("catalog change callback failed", error=repr(exc))

    def close(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.close()
