"""Declaring the shared RabbitMQ topology: central owns it, registers declare nothing.

Every name and argument comes from :mod:`tillsync_protocol.topology`; this module only
turns that description into AMQP declarations. Declaring is idempotent, so every central
process does it at start-up; a declaration whose arguments differ from an existing
queue's fails with ``PRECONDITION_FAILED`` and stops the process, which is what we want:
a quorum queue cannot be turned into a classic one by accident.
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from tillsync_protocol import topology

__all__ = ["DECLARE_TIMEOUT_S", "declare_topology", "verify_topology"]

DECLARE_TIMEOUT_S = 30.0


async def declare_topology(channel: AbstractChannel) -> None:
    """Declare every shared exchange, queue (with its arguments) and binding."""
    declared_exchanges: dict[str, AbstractExchange] = {}
    for exchange in topology.exchanges():
        declared_exchanges[exchange.name] = await channel.declare_exchange(
            exchange.name,
            aio_pika.ExchangeType(exchange.type),
            durable=exchange.durable,
            timeout=DECLARE_TIMEOUT_S,
        )
    declared_queues: dict[str, AbstractQueue] = {}
    for queue in topology.queues():
        declared_queues[queue.name] = await channel.declare_queue(
            queue.name,
            durable=queue.durable,
            arguments=queue.arguments,
            timeout=DECLARE_TIMEOUT_S,
        )
    for binding in topology.shared_bindings():
        await declared_queues[binding.queue].bind(
            declared_exchanges[binding.exchange],
            routing_key=binding.routing_key,
            timeout=DECLARE_TIMEOUT_S,
        )


async def verify_topology(channel: AbstractChannel) -> None:
    """Check that every shared exchange and queue exists, by passive declarations, which
    need no configure right (the least-privilege service user has none). Raises aio-pika's
    ``ChannelNotFoundEntity`` for the first one missing. Bindings cannot be checked so."""
    for exchange in topology.exchanges():
        await channel.declare_exchange(exchange.name, passive=True, timeout=DECLARE_TIMEOUT_S)
    for queue in topology.queues():
        await channel.declare_queue(queue.name, passive=True, timeout=DECLARE_TIMEOUT_S)
