"""The batch consumer: its collection against real RabbitMQ (an idle worker waits for
more, a busy one takes what waited at once), and its connect attempts on a silent link."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from amqp_connections import watch_connections
from tillsync_central import consumer
from tillsync_central.consumer import BatchConsumer, Session
from tillsync_central.settings import CentralSettings

QUEUE = "test.batches"
MAX_WAIT_S = 60.0  # far longer than any wait the test allows: a wait shows as a timeout


class Recorder(BatchConsumer):
    queue_name = QUEUE
    name = "recorder"

    def __init__(self, url: str, **options: float) -> None:
        super().__init__(url, prefetch=100, batch_size=3, max_wait=MAX_WAIT_S, **options)
        self.batches: asyncio.Queue[list[bytes]] = asyncio.Queue()
        self.release = asyncio.Event()

    async def handle(self, batch: Sequence[AbstractIncomingMessage], session: Session) -> bool:
        await self.batches.put([bytes(m.body) for m in batch])
        await self.release.wait()  # the test decides when a batch is done
        return True


async def test_an_idle_worker_gathers_and_a_busy_one_takes_what_waited(
    settings: CentralSettings,
) -> None:
    url = settings.amqp_url.get_secret_value()
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, durable=True)

        async def publish(*bodies: bytes) -> None:
            for body in bodies:
                await channel.default_exchange.publish(aio_pika.Message(body), QUEUE)

        worker = Recorder(url)
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping))
        try:
            await asyncio.wait_for(worker.connected.wait(), 15)
            worker.release.set()
            # Idle: the first delivery waits for more, up to the batch size here.
            await publish(b"1")
            await asyncio.sleep(1.0)
            assert worker.batches.empty()
            await publish(b"2", b"3")
            assert await asyncio.wait_for(worker.batches.get(), 15) == [b"1", b"2", b"3"]
            # Busy: two deliveries arrive while a batch is handled; they go at once after.
            worker.release.clear()
            await publish(b"4", b"5", b"6")
            assert await asyncio.wait_for(worker.batches.get(), 15) == [b"4", b"5", b"6"]
            await publish(b"7", b"8")
            for _ in range(150):  # both delivered to the worker, none ready in the queue
                declared = await channel.declare_queue(QUEUE, passive=True)
                if declared.declaration_result.message_count == 0:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the broker did not deliver 7 and 8")
            worker.release.set()
            assert await asyncio.wait_for(worker.batches.get(), 15) == [b"7", b"8"]
        finally:
            worker.release.set()
            stopping.set()
            await asyncio.wait_for(task, 30)
        await asyncio.sleep(0.5)  # the last basic.ack reaches the broker
        declared = await channel.declare_queue(QUEUE, passive=True)
        assert declared.declaration_result.message_count == 0
        await queue.delete(if_unused=False, if_empty=False)


async def test_a_connect_attempt_that_times_out_closes_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker that accepts and never answers: each attempt given up is closed by the
    worker, not left to the garbage collector (see ``consumer.connect_amqp``)."""
    monkeypatch.setattr(consumer, "CONNECT_TIMEOUT_S", 0.3)
    made = watch_connections(monkeypatch)
    closed: asyncio.Queue[None] = asyncio.Queue()

    async def silent_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the protocol header, then nothing until the worker's EOF
        closed.put_nowait(None)
        writer.close()

    server = await asyncio.start_server(silent_broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # The next attempt 0.25-0.5 s after the last: none starts while the test looks.
    worker = Recorder(f"amqp://u:p@127.0.0.1:{port}/", reconnect_base=0.5, reconnect_cap=0.5)
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping))
    try:
        for _ in range(2):
            await asyncio.wait_for(closed.get(), timeout=10)
            await asyncio.sleep(0.05)  # the attempt's close runs on
            assert made
            assert all(c.is_closed for c in made), "a connection left open"
        assert not worker.connected.is_set()
    finally:
        stopping.set()
        await asyncio.wait_for(task, timeout=30)
        server.close()
        await server.wait_closed()
