"""An in-process TCP proxy that injects network faults, after toxiproxy's toxics.

Tests put a ``FaultProxy`` between a client (a register agent, aio-pika) and a real server
(RabbitMQ) and change its faults while traffic flows::

    async with FaultProxy("127.0.0.1", 5672) as proxy:
        connection = await aio_pika.connect(proxy.url_for(amqp_url))
        proxy.latency(200)
        proxy.cut()  # every live connection is reset, new ones are refused
        proxy.heal()

Faults apply per direction: ``up`` is client → upstream, ``down`` is upstream → client.
Every buffer is bounded (a small queue of chunks per direction, and ``drain`` on every
write), so a stalled peer stalls the other side through TCP back-pressure instead of
growing memory.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Direction", "FaultProxy"]

Direction = Literal["up", "down", "both"]

_LISTEN_HOST = "127.0.0.1"
_READ_SIZE = 64 * 1024
# Chunks read but not yet written, per direction: the bound on what the proxy holds.
_QUEUE_CHUNKS = 8
_CONNECT_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 5.0


@dataclass
class _Faults:
    """The faults in force for one direction."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bytes_per_s: int | None = None
    slice_max: int | None = None
    slice_delay_ms: float = 0.0
    limit: int | None = None


@dataclass(frozen=True)
class _Chunk:
    data: bytes
    read_at: float
    # Drawn once per chunk so that re-evaluating the latency deadline is stable.
    jitter: float


class _LimitReached(Exception):
    """A direction forwarded all that ``limit_data`` allows."""


def _set_reset_on_close(writer: asyncio.StreamWriter) -> None:
    """Make closing this connection's socket send RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already gone: nothing left to reset


class FaultProxy:
    """Forwards TCP connections on 127.0.0.1 to one upstream, with injectable faults.

    Use as an async context manager; on exit the listener closes and every live
    connection is aborted. Fault setters are plain methods and take effect at once,
    on live connections as well as new ones.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = _LISTEN_HOST,
        listen_port: int = 0,
        *,
        seed: int | None = None,
    ) -> None:
        if listen_host != _LISTEN_HOST:
            raise ValueError(f"FaultProxy only listens on {_LISTEN_HOST}, not {listen_host!r}")
        self._upstream = (upstream_host, upstream_port)
        self._listen = (listen_host, listen_port)
        self._rng = random.Random(seed)
        self._faults = {"up": _Faults(), "down": _Faults()}
        self._blackholed = False
        self._refusing = False
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[Exception] = []
        self.bytes_up = 0
        """Bytes written to the upstream, over all connections."""
        self.bytes_down = 0
        """Bytes written back to clients, over all connections."""

    # -- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        host, port = self._listen
        self._server = await asyncio.start_server(self._on_client, host, port)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort(reset=False)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT)
        if server is not None:
            await asyncio.wait_for(server.wait_closed(), timeout=_CLOSE_TIMEOUT)
        if self._errors and exc_type is None:
            raise ExceptionGroup("FaultProxy connection tasks failed", self._errors)

    # -- addresses and counters -------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (127.0.0.1)."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started; use `async with`")
        return self._port

    @property
    def connections(self) -> int:
        """Live client connections (each with its upstream connection, once opened)."""
        return len(self._links)

    def url_for(self, url: str) -> str:
        """Return ``url`` with its host and port replaced by the proxy's.

        ``amqp://u:p@127.0.0.1:5672/vhost`` becomes ``amqp://u:p@127.0.0.1:<port>/vhost``;
        user, password, path and query are kept as they are.
        """
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}{_LISTEN_HOST}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def wait_connections(self, count: int, timeout: float = 5.0) -> None:
        """Wait until exactly ``count`` connections are live; TimeoutError past ``timeout``."""
        async with asyncio.timeout(timeout):
            while len(self._links) != count:
                await self._changed.wait()

    # -- faults -----------------------------------------------------------------------

    def latency(self, ms: float, jitter_ms: float = 0, direction: Direction = "both") -> None:
        """Delay each chunk by ``ms`` ± ``jitter_ms`` in ``direction``, keeping order.

        Latency is per direction: a request-response round trip through ``"both"``
        takes at least ``2 * ms`` more.
        """
        if ms < 0 or jitter_ms < 0:
            raise ValueError("latency and jitter must be >= 0")
        for faults in self._directed(direction):
            faults.latency_ms, faults.jitter_ms = ms, jitter_ms
        self._notify()

    def bandwidth(self, bytes_per_s: int, direction: Direction = "both") -> None:
        """Limit each connection to ``bytes_per_s`` in ``direction``."""
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be > 0")
        for faults in self._directed(direction):
            faults.bytes_per_s = bytes_per_s
        self._notify()

    def slicer(self, max_chunk: int, delay_ms: float = 0, direction: Direction = "both") -> None:
        """Write data in pieces of 1..``max_chunk`` bytes, ``delay_ms`` apart."""
        if max_chunk < 1 or delay_ms < 0:
            raise ValueError("max_chunk must be >= 1 and delay_ms >= 0")
        for faults in self._directed(direction):
            faults.slice_max, faults.slice_delay_ms = max_chunk, delay_ms
        self._notify()

    def limit_data(self, n_bytes: int, direction: Direction = "both") -> None:
        """Close a connection once ``n_bytes`` more have gone through it in ``direction``.

        Counted per connection and direction from now on; the connection is closed
        with FIN after exactly ``n_bytes`` have been written.
        """
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        for name in self._names(direction):
            self._faults[name].limit = n_bytes
            for link in self._links:
                link.set_limit(name, n_bytes)
        self._notify()

    def blackhole(self) -> None:
        """Forward nothing, in either direction, on live and new connections.

        Sockets stay open and data stays where it is (in the proxy's small queues and
        the kernel's buffers), as on a silent network; new connections are accepted
        but not connected upstream. ``clear`` lets everything flow again.
        """
        self._blackholed = True
        self._notify()

    def refuse(self, refusing: bool = True) -> None:
        """While ``refusing``, accept each new connection and reset it at once.

        Live connections are untouched (see ``reset_all``).
        """
        self._refusing = refusing
        self._notify()

    def reset_all(self) -> None:
        """Abort every live connection with RST, on both the client and upstream side."""
        for link in list(self._links):
            link.abort(reset=True)
        self._notify()

    def clear(self) -> None:
        """Remove latency, bandwidth, slicer, limit and blackhole faults (not ``refuse``)."""
        self._faults = {"up": _Faults(), "down": _Faults()}
        for link in self._links:
            link.set_limit("up", None)
            link.set_limit("down", None)
        self._blackholed = False
        self._notify()

    def cut(self) -> None:
        """Break the link: reset every live connection and refuse new ones."""
        self.refuse(True)
        self.reset_all()

    def heal(self) -> None:
        """Remove every fault and accept new connections again."""
        self.clear()
        self.refuse(False)

    # -- internals shared with links --------------------------------------------------

    @staticmethod
    def _names(direction: Direction) -> tuple[Literal["up", "down"], ...]:
        if direction == "both":
            return ("up", "down")
        if direction in ("up", "down"):
            return (direction,)
        raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")

    def _directed(self, direction: Direction) -> list[_Faults]:
        return [self._faults[name] for name in self._names(direction)]

    def _notify(self) -> None:
        # Waiters hold the event they started on; setting it wakes them to re-check.
        self._changed.set()
        self._changed = asyncio.Event()

    def _hold_deadline(self) -> float:
        return math.inf if self._blackholed else 0.0

    async def _wait_until(self, deadline: Callable[[], float]) -> None:
        """Wait until loop time reaches ``deadline()``, re-evaluated on every fault change."""
        loop = asyncio.get_running_loop()
        while True:
            changed = self._changed
            remaining = deadline() - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(None if math.isinf(remaining) else remaining):
                    await changed.wait()
            except TimeoutError:
                pass

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, so the connection's task is created and tracked here.
        if self._refusing or self._server is None:
            _set_reset_on_close(writer)
            writer.transport.abort()
            return
        link = _Link(self, reader, writer)
        task = asyncio.get_running_loop().create_task(self._serve(link))
        link.task = task
        self._tasks.add(task)
        self._links.add(link)
        self._notify()

        def _done(done: asyncio.Task[None]) -> None:
            self._tasks.discard(done)
            self._links.discard(link)
            error = None if done.cancelled() else done.exception()
            if isinstance(error, Exception):
                self._errors.append(error)  # a bug in the proxy: raised on exit
            self._notify()

        task.add_done_callback(_done)

    async def _serve(self, link: _Link) -> None:
        try:
            await link.run()
        except* _LimitReached:
            link.close()
        except* (OSError, EOFError, TimeoutError):
            # A reset, refused or timed-out side: the other side sees a reset too.
            link.abort(reset=True)
        else:
            link.close()
        finally:
            link.abort(reset=False)  # a no-op after close or abort; releases sockets on cancel

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self._upstream
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            return await asyncio.open_connection(host, port)


class _Link:
    """One client connection and its upstream connection."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._proxy = proxy
        self._client = (reader, writer)
        self._upstream_writer: asyncio.StreamWriter | None = None
        self._flows: dict[str, _Flow] = {}
        self._limits: dict[str, int | None] = {
            name: proxy._faults[name].limit for name in ("up", "down")
        }
        self._finished = False
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        # A blackholed network carries no SYN either: connect upstream only once it flows.
        await self._proxy._wait_until(self._proxy._hold_deadline)
        upstream_reader, upstream_writer = await self._proxy._open_upstream()
        self._upstream_writer = upstream_writer
        client_reader, client_writer = self._client
        self._flows = {
            "up": _Flow(self._proxy, "up", client_reader, upstream_writer, self._limits["up"]),
            "down": _Flow(
                self._proxy, "down", upstream_reader, client_writer, self._limits["down"]
            ),
        }
        async with asyncio.TaskGroup() as group:
            for flow in self._flows.values():
                group.create_task(flow.read_loop())
                group.create_task(flow.write_loop())

    def set_limit(self, name: str, limit: int | None) -> None:
        self._limits[name] = limit
        if name in self._flows:
            self._flows[name].remaining = limit

    def _writers(self) -> list[asyncio.StreamWriter]:
        writers = [self._client[1]]
        if self._upstream_writer is not None:
            writers.append(self._upstream_writer)
        return writers

    def close(self) -> None:
        """Close both sides with FIN, after what was already written."""
        if self._finished:
            return
        self._finished = True
        for writer in self._writers():
            writer.close()

    def abort(self, *, reset: bool) -> None:
        """Drop both sides at once (with RST if ``reset``) and stop forwarding."""
        if self._finished:
            return
        self._finished = True
        for writer in self._writers():
            if reset:
                _set_reset_on_close(writer)
            writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class _Flow:
    """Bytes in one direction of a link: a reader task and a writer task, with a
    bounded queue between them so that latency delays chunks without serialising them."""

    def __init__(
        self,
        proxy: FaultProxy,
        name: Literal["up", "down"],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        remaining: int | None,
    ) -> None:
        self._proxy = proxy
        self._name: Literal["up", "down"] = name
        self._reader = reader
        self._writer = writer
        self._queue: asyncio.Queue[_Chunk | None] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        self._next_send = 0.0
        self.remaining = remaining

    @property
    def _faults(self) -> _Faults:
        return self._proxy._faults[self._name]

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._proxy._wait_until(self._proxy._hold_deadline)
            data = await self._reader.read(_READ_SIZE)
            if not data:
                await self._queue.put(None)
                return
            await self._queue.put(_Chunk(data, loop.time(), self._proxy._rng.uniform(-1, 1)))

    async def write_loop(self) -> None:
        while True:
            chunk = await self._queue.get()
            if chunk is None:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            await self._proxy._wait_until(functools.partial(self._latency_deadline, chunk))
            await self._deliver(chunk.data)

    def _latency_deadline(self, chunk: _Chunk) -> float:
        faults = self._faults
        delay_ms = max(0.0, faults.latency_ms + chunk.jitter * faults.jitter_ms)
        return math.inf if self._proxy._blackholed else chunk.read_at + delay_ms / 1000

    async def _deliver(self, data: bytes) -> None:
        position = 0
        while position < len(data):
            await self._proxy._wait_until(self._proxy._hold_deadline)
            faults = self._faults
            size = len(data) - position
            if faults.slice_max is not None:
                size = min(size, self._proxy._rng.randint(1, faults.slice_max))
            if faults.bytes_per_s is not None:
                size = min(size, max(1, faults.bytes_per_s // 10))
                await self._throttle(size)
            if self.remaining is not None:
                size = min(size, self.remaining)
            if size:
                await self._write(data[position : position + size])
                position += size
            if self.remaining is not None:
                self.remaining -= size
                if self.remaining <= 0:
                    raise _LimitReached(self._name)
            if faults.slice_max is not None and faults.slice_delay_ms and position < len(data):
                await self._slice_pause(faults.slice_delay_ms)

    async def _slice_pause(self, delay_ms: float) -> None:
        resume_at = asyncio.get_running_loop().time() + delay_ms / 1000
        await self._proxy._wait_until(
            lambda: resume_at if self._faults.slice_max is not None else 0.0
        )

    async def _throttle(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        rate = self._faults.bytes_per_s
        if rate is None:
            return
        self._next_send = max(loop.time(), self._next_send) + size / rate
        send_at = self._next_send
        await self._proxy._wait_until(
            lambda: send_at if self._faults.bytes_per_s is not None else 0.0
        )

    async def _write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()
        if self._name == "up":
            self._proxy.bytes_up += len(data)
        else:
            self._proxy.bytes_down += len(data)
