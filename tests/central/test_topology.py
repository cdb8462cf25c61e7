"""The shared topology as central declares it, read back from the broker."""

from __future__ import annotations

from urllib.parse import quote

import aio_pika
import httpx

from services import RabbitApi, vhost_of
from tillsync_central.runner import declare
from tillsync_central.settings import CentralSettings
from tillsync_protocol import topology


async def test_declares_every_exchange_queue_and_binding(
    settings: CentralSettings, rabbitmq_api: RabbitApi
) -> None:
    await declare(settings)
    await declare(settings)  # idempotent: a second process starting finds it all in place
    vhost = quote(vhost_of(settings.amqp_url.get_secret_value()), safe="")
    async with httpx.AsyncClient(base_url=rabbitmq_api.base_url, auth=rabbitmq_api.auth) as api:
        exchanges = {e["name"]: e for e in (await api.get(f"/api/exchanges/{vhost}")).json()}
        queues = {q["name"]: q for q in (await api.get(f"/api/queues/{vhost}")).json()}
        bindings = (await api.get(f"/api/bindings/{vhost}")).json()
    for exchange in topology.exchanges():
        assert exchanges[exchange.name]["type"] == exchange.type
        assert exchanges[exchange.name]["durable"] is True
    assert set(queues) == {q.name for q in topology.queues()}
    for queue in topology.queues():
        assert queues[queue.name]["arguments"] == queue.arguments
        assert queues[queue.name]["durable"] is True
    ingest = queues[topology.INGEST_QUEUE]
    assert ingest["type"] == "quorum"
    assert ingest["arguments"]["x-delivery-limit"] == topology.INGEST_DELIVERY_LIMIT
    assert ingest["arguments"]["x-dead-letter-strategy"] == "at-least-once"
    assert ingest["arguments"]["x-overflow"] == "reject-publish"
    found = {(b["source"], b["destination"], b["routing_key"]) for b in bindings if b["source"]}
    for binding in topology.shared_bindings():
        assert (binding.exchange, binding.queue, binding.routing_key) in found


async def test_a_document_published_to_the_docs_exchange_reaches_the_ingest_queue(
    settings: CentralSettings,
) -> None:
    await declare(settings)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(b"x"), "c.r.receipt", mandatory=True, timeout=10)
        queue = await channel.get_queue(topology.INGEST_QUEUE, ensure=False)
        message = await queue.get(timeout=10, fail=True)
        assert message is not None
        assert message.body == b"x"
        await message.ack()
