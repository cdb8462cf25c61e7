"""FaultProxy against a real echo server (and, once, the real RabbitMQ)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from types import TracebackType
from urllib.parse import urlsplit

import aio_pika
import pytest

from faults import FaultProxy

AMQP_URL = os.environ.get("TILLSYNC_AMQP_URL", "amqp://tillsync:tillsync@127.0.0.1:5672/")

# How long a fault must keep data back before a test calls it held.
HOLD = 0.5
# How long a promptly visible effect (a reset, an EOF) may take.
PROMPT = 3.0


class EchoServer:
    """Echoes every byte back; counts what it received, in how many reads, and its peers."""

    def __init__(self) -> None:
        self.received = 0
        self.reads = 0
        self.resets = 0
        self.accepted = 0
        self.live = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed = asyncio.Condition()

    async def wait_live(self, count: int, timeout: float = PROMPT) -> None:
        """Wait until exactly ``count`` clients are connected, failing after ``timeout``."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.live == count)

    async def _set_live(self, delta: int) -> None:
        async with self._changed:
            self.live += delta
            self._changed.notify_all()

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=PROMPT)
        await self._server.wait_closed()

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._echo(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await self._set_live(1)
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                self.reads += 1
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            self.resets += 1
        finally:
            self._writers.discard(writer)
            writer.close()
            await self._set_live(-1)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(PROMPT):
        return await asyncio.open_connection("127.0.0.1", proxy.port)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = PROMPT) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.readexactly(n)


async def read_to_end(reader: asyncio.StreamReader, timeout: float = PROMPT) -> tuple[bytes, bool]:
    """Read until the peer closes; return the bytes and whether it ended with a reset."""
    data = bytearray()
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            return bytes(data), True
    return bytes(data), False


def payload(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await read_exactly(reader, len(data))


async def test_bytes_pass_intact_and_are_counted(proxy: FaultProxy, echo: EchoServer) -> None:
    data = payload(300_000)
    reader, writer = await connect(proxy)
    await proxy.wait_connections(1)

    sent = asyncio.ensure_future(round_trip(reader, writer, data))
    assert await sent == data
    writer.close()
    await proxy.wait_connections(0)

    assert proxy.bytes_up == proxy.bytes_down == echo.received == len(data)


def test_url_for_replaces_host_and_port_only(proxy: FaultProxy) -> None:
    port = proxy.port
    assert proxy.url_for("amqp://u:p@127.0.0.1:5672/vhost") == f"amqp://u:p@127.0.0.1:{port}/vhost"
    assert proxy.url_for("amqp://localhost/?heartbeat=5") == f"amqp://127.0.0.1:{port}/?heartbeat=5"


def test_listens_only_on_loopback() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        FaultProxy("127.0.0.1", 5672, listen_host="0.0.0.0")


async def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"warm") == b"warm"

    proxy.latency(150)
    started = time.monotonic()
    assert await round_trip(reader, writer, b"ping") == b"ping"
    assert time.monotonic() - started >= 2 * 0.150

    proxy.clear()
    proxy.latency(200, jitter_ms=50, direction="down")
    started = time.monotonic()
    assert await round_trip(reader, writer, b"pong") == b"pong"
    assert time.monotonic() - started >= 0.150
    writer.close()


async def test_latency_pipelines_instead_of_serialising(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.latency(500, direction="up")
    started = time.monotonic()
    for _ in range(10):
        writer.write(b"x" * 100)
        await writer.drain()
        await asyncio.sleep(0.01)  # the writes must reach the proxy as separate chunks
    assert await read_exactly(reader, 1000) == b"x" * 1000
    # Ten chunks each held 500 ms, in flight together: far less than 10 x 500 ms.
    assert 0.5 <= time.monotonic() - started < 2.5
    writer.close()


async def test_clearing_a_fault_releases_held_data_at_once(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.latency(60_000)
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await read_exactly(reader, 4, timeout=HOLD)
    proxy.clear()
    assert await read_exactly(reader, 4) == b"held"
    writer.close()


async def test_blackhole_holds_data_and_heal_resumes(proxy: FaultProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"before") == b"before"

    proxy.blackhole()
    writer.write(b"into the void")
    with pytest.raises(TimeoutError):
        await read_exactly(reader, 13, timeout=HOLD)
    # New connections are accepted and held, but nothing reaches the upstream.
    held_reader, held_writer = await connect(proxy)
    held_writer.write(b"hello?")
    with pytest.raises(TimeoutError):
        await read_exactly(held_reader, 6, timeout=HOLD)
    assert proxy.connections == 2
    assert echo.accepted == 1
    assert not reader.at_eof()

    proxy.heal()
    fresh_reader, fresh_writer = await connect(proxy)
    assert await round_trip(fresh_reader, fresh_writer, b"after") == b"after"
    # Nothing was lost: what was held is delivered once the network flows again.
    assert await read_exactly(reader, 13) == b"into the void"
    assert await read_exactly(held_reader, 6) == b"hello?"
    for w in (writer, held_writer, fresh_writer):
        w.close()


async def test_reset_all_resets_both_sides_promptly(proxy: FaultProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"ping") == b"ping"
    assert echo.live == 1

    proxy.reset_all()
    assert await read_to_end(reader) == (b"", True)
    await proxy.wait_connections(0)
    await echo.wait_live(0)
    assert echo.resets == 1

    # Only live connections are hit: a new one works.
    reader2, writer2 = await connect(proxy)
    assert await round_trip(reader2, writer2, b"again") == b"again"
    writer.close()
    writer2.close()


async def test_refuse_closes_new_connections(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.refuse(True)
    for _ in range(3):
        try:
            reader, writer = await connect(proxy)
        except OSError:
            continue
        writer.write(b"anyone?")
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await read_exactly(reader, 7)
        writer.close()
    assert echo.accepted == 0
    assert proxy.connections == 0

    proxy.refuse(False)
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"open") == b"open"
    writer.close()


async def test_cut_then_heal(proxy: FaultProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"ping") == b"ping"

    proxy.latency(1000)
    proxy.cut()
    assert (await read_to_end(reader))[0] == b""
    refused_reader, refused_writer = await connect(proxy)
    assert (await read_to_end(refused_reader))[0] == b""
    assert echo.accepted == 1

    proxy.heal()
    reader, writer = await connect(proxy)
    started = time.monotonic()
    assert await round_trip(reader, writer, b"healed") == b"healed"
    assert time.monotonic() - started < 1.0  # heal cleared the latency too
    writer.close()
    refused_writer.close()


async def test_limit_data_down_closes_after_n_bytes(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.limit_data(10, direction="down")
    writer.write(payload(100))
    data, reset = await read_to_end(reader)
    assert data == payload(100)[:10]
    assert not reset
    await proxy.wait_connections(0)
    assert proxy.bytes_down == 10
    writer.close()


async def test_limit_data_up_closes_after_n_bytes(proxy: FaultProxy, echo: EchoServer) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"12345") == b"12345"
    proxy.limit_data(10, direction="up")  # counted from now on
    writer.write(payload(100))
    data, _reset = await read_to_end(reader)
    assert len(data) <= 10
    await proxy.wait_connections(0)
    assert echo.received == 5 + 10
    assert proxy.bytes_up == 15
    writer.close()


async def test_slicer_delivers_all_bytes_in_small_pieces(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    data = payload(5_000)
    reader, writer = await connect(proxy)
    proxy.slicer(64, delay_ms=1, direction="up")
    assert await round_trip(reader, writer, data) == data
    assert echo.received == len(data)
    # At most 64 bytes at a time, 1 ms apart: the server sees many small reads.
    assert echo.reads > 10
    writer.close()


async def test_bandwidth_limits_throughput(proxy: FaultProxy) -> None:
    data = payload(64 * 1024)
    reader, writer = await connect(proxy)
    proxy.bandwidth(32 * 1024)
    started = time.monotonic()
    assert await round_trip(reader, writer, data) == data
    assert time.monotonic() - started >= 1.5
    writer.close()


async def test_exit_closes_live_connections(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        assert await round_trip(reader, writer, b"ping") == b"ping"
        proxy.blackhole()
        held_reader, held_writer = await connect(proxy)
        await proxy.wait_connections(2)
    assert proxy.connections == 0
    assert (await read_to_end(reader))[0] == b""
    assert (await read_to_end(held_reader))[0] == b""
    await echo.wait_live(0)
    writer.close()
    held_writer.close()


async def test_rabbitmq_connection_dies_on_cut_and_reconnects_on_heal() -> None:
    upstream = urlsplit(AMQP_URL)
    async with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 5672) as proxy:
        url = proxy.url_for(AMQP_URL)
        connection = await aio_pika.connect(url, timeout=5)
        lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        def on_close(_sender: object, exc: BaseException | None = None) -> None:
            if not lost.done():
                lost.set_result(exc)

        connection.close_callbacks.add(on_close)
        try:
            channel = await connection.channel(publisher_confirms=True)
            queue = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(
                aio_pika.Message(b"before"), routing_key=queue.name, timeout=5
            )
            message = await queue.get(timeout=5, no_ack=True)
            assert message is not None
            assert message.body == b"before"

            proxy.cut()
            async with asyncio.timeout(PROMPT):
                await lost
            with pytest.raises(Exception):  # noqa: B017, PT011 - any error, as long as it fails
                async with asyncio.timeout(PROMPT):
                    await channel.default_exchange.publish(
                        aio_pika.Message(b"lost"), routing_key=queue.name, timeout=PROMPT
                    )
            with pytest.raises(Exception):  # noqa: B017, PT011
                await aio_pika.connect(url, timeout=PROMPT)
        finally:
            async with asyncio.timeout(PROMPT):
                await connection.close()

        proxy.heal()
        again = await aio_pika.connect(url, timeout=5)
        try:
            channel = await again.channel(publisher_confirms=True)
            queue = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(
                aio_pika.Message(b"after"), routing_key=queue.name, timeout=5
            )
            message = await queue.get(timeout=5, no_ack=True)
            assert message is not None
            assert message.body == b"after"
        finally:
            async with asyncio.timeout(PROMPT):
                await again.close()
