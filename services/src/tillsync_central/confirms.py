"""Publishing many messages in order with publisher confirms, many in flight.

One channel delivers messages to a queue in the order they were published. Each publish
is started as its own task, in order (aiormq takes its channel lock FIFO before the
first suspension, so frames leave in task order); at most ``window`` wait for their
confirm at once. Every publish has a timeout (a publish can hang while disconnected).
Any failure cancels the rest and raises: the caller has not stored progress and will
publish again, so the receiver may see a message twice, never a hole.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

import aio_pika
from aio_pika.abc import AbstractExchange

from tillsync_protocol import CONTENT_TYPE, ControlMessage, encode

__all__ = ["PUBLISH_TIMEOUT_S", "control_message", "publish_in_order"]

PUBLISH_TIMEOUT_S = 10.0


def control_message(message: ControlMessage, *, persistent: bool = True) -> aio_pika.Message:
    """A control message as central publishes it: its MessagePack bytes, ``message_id``
    its ``msg_id`` and AMQP ``type`` its type."""
    return aio_pika.Message(
        encode(message),
        content_type=CONTENT_TYPE,
        delivery_mode=(
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        ),
        message_id=message.msg_id,
        type=message.type,
        app_id="tillsync-central",
    )


async def publish_in_order(
    exchange: AbstractExchange,
    messages: Iterable[tuple[aio_pika.Message, str]],
    *,
    window: int = 256,
    timeout: float = PUBLISH_TIMEOUT_S,
) -> int:
    """Publish ``(message, routing_key)`` pairs in order; return when all are confirmed."""
    in_flight: deque[asyncio.Task[object]] = deque()
    count = 0
    try:
        for message, key in messages:
            if len(in_flight) >= window:
                await in_flight.popleft()
            in_flight.append(
                asyncio.create_task(
                    exchange.publish(message, key, mandatory=False, timeout=timeout)
                )
            )
            count += 1
        while in_flight:
            await in_flight.popleft()
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
    return count
