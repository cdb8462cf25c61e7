"""The agent's link to RabbitMQ: connect, serve, and reconnect with backoff.

We own this loop instead of using aio-pika's robust connection, whose publishes can hang
while it is disconnected: here every await has a timeout, and the link's state
(connected or not, last error, next retry) is explicit and shown by ``status``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, AbstractExchange, AbstractIncomingMessage
from aio_pika.connection import make_url

from tillsync_protocol import Backoff, topology

from .outbox import now_ms
from .redaction import redact
from .sender import Sender
from .settings import AgentSettings
from .tls import ssl_context

__all__ = ["Link", "LinkState"]

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 5.0


@dataclass
class LinkState:
    connected: bool = False
    connected_since: int | None = None
    last_error: str | None = None
    reconnects: int = 0
    next_retry_in_s: float | None = None


class Link:
    def __init__(
        self,
        settings: AgentSettings,
        sender: Sender,
        on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._sender = sender
        self._on_message = on_message
        self._backoff = Backoff(settings.reconnect_base_s, settings.reconnect_cap_s)
        self.state = LinkState()
        self.rpc_exchange: AbstractExchange | None = None
        """``tillsync.rpc`` on the publish channel (confirms, returns raise) while up."""
        self.presence_exchange: AbstractExchange | None = None
        """``tillsync.presence`` on the same channel while up (heartbeats)."""
        self.on_up: list[Callable[[], None]] = []
        """Called once consuming has started and the publish channel is ready."""
        self.on_down: list[Callable[[], None]] = []

    async def run(self, stopping: asyncio.Event) -> None:
        """Stay connected until ``stopping`` is set; never busy-loops."""
        while not stopping.is_set():
            try:
                await self._connect_and_serve(stopping)
            except (TimeoutError, Exception) as exc:
                self.state.last_error = redact(f"{type(exc).__name__}: {exc}")
                log.warning(
                    "link down", register_id=self._settings.register_id, error=self.state.last_error
                )
            self.state.connected = False
            self.state.connected_since = None
            if stopping.is_set():
                break
            delay = self._backoff.next()
            self.state.next_retry_in_s = round(delay, 2)
            try:
                await asyncio.wait_for(stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
            self.state.reconnects += 1

    async def _connect_and_serve(self, stopping: asyncio.Event) -> None:
        connection = await _connect(self._settings)
        closed = asyncio.Event()
        connection.close_callbacks.add(lambda *_: closed.set())
        try:
            publish_channel = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            publish_channel.close_callbacks.add(lambda *_: closed.set())
            consume_channel = await connection.channel()
            consume_channel.close_callbacks.add(lambda *_: closed.set())
            await consume_channel.set_qos(prefetch_count=200)
            # Central provisions the register's queue; a register declares nothing.
            queue = await consume_channel.get_queue(
                topology.register_queue(self._settings.register_id), ensure=False
            )
            await queue.consume(self._on_message)
            exchange = await publish_channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
            self.rpc_exchange = await publish_channel.get_exchange(
                topology.RPC_EXCHANGE, ensure=False
            )
            self.presence_exchange = await publish_channel.get_exchange(
                topology.PRESENCE_EXCHANGE, ensure=False
            )
            self.state.connected = True
            self.state.connected_since = now_ms()
            self.state.last_error = None
            self.state.next_retry_in_s = None
            self._backoff.reset()
            log.info("link up", register_id=self._settings.register_id)
            for callback in self.on_up:
                callback()
            await self._sender.serve(exchange, closed, stopping)
            if closed.is_set() and not stopping.is_set():
                raise ConnectionError("connection closed by the broker")
        finally:
            self.presence_exchange = None
            if self.rpc_exchange is not None:
                self.rpc_exchange = None
                for callback in self.on_down:
                    callback()
            try:
                await asyncio.wait_for(connection.close(), timeout=CLOSE_TIMEOUT_S)
            except (TimeoutError, Exception):
                pass


async def _connect(settings: AgentSettings) -> AbstractConnection:
    """``aio_pika.connect``, except that a connection that fails or times out on its way
    up is closed here. aio-pika leaves it to the garbage collector: on a silent or cut
    link, every attempt left a socket open until then, or for good when no event loop
    was running at that moment (a ``RuntimeWarning``)."""
    connection = aio_pika.Connection(
        make_url(settings.amqp_url.get_secret_value()),
        ssl_context=ssl_context(settings),  # None for amqp://
        client_properties={"connection_name": f"tillsync-agent {settings.register_id}"},
    )
    try:
        await asyncio.wait_for(
            connection.connect(timeout=CONNECT_TIMEOUT_S), timeout=CONNECT_TIMEOUT_S + 1
        )
    except BaseException:
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(connection.close(), timeout=CLOSE_TIMEOUT_S)
        raise
    return connection
