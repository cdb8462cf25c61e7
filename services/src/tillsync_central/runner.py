"""Running central's workers in one process: ``tillsync-central run``.

Start-up migrates the database and declares the shared topology (both idempotent, so
several processes may start together) — waiting, with a log line per try and capped
backoff, while PostgreSQL or RabbitMQ cannot be reached yet (a machine booting, a
service restarting), not failing — then runs, in one ``asyncio.TaskGroup`` until
SIGTERM or SIGINT: N ingest workers and the dead-letter worker, the catalog relay (active
in one process at a time, standby in the others), M catalog RPC workers, the presence
worker and the reconciler (seq holes and Z-reports, one pass at a time across processes).
Scaling out is starting another process: the workers compete on the same quorum queues.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import aio_pika
import asyncpg
import structlog

from tillsync_protocol import Backoff, ConfigError

from .admin.app import serving_admin
from .catalog_rpc import CatalogRpcWorker, RpcStats
from .consumer import wait_any
from .db import connect, create_pool, migrate
from .ingest import DeadLetterWorker, IngestStats, IngestWorker
from .metrics import serving_metrics
from .presence import PresenceWorker
from .reconcile import Reconciler
from .relay import Relay
from .settings import CentralSettings, redact_url
from .store import is_transient
from .systemd import Notifier, run_supervised
from .topology import declare_topology, verify_topology

__all__ = ["CentralService", "IngestService", "declare", "run"]

log = structlog.get_logger(__name__)

POOL_CLOSE_TIMEOUT_S = 10.0
STARTUP_RETRY_BASE_S = 0.5
STARTUP_RETRY_CAP_S = 30.0

T = TypeVar("T")


class _StoppedWhileWaiting(Exception):
    """SIGTERM (or ``stopping``) came while start-up waited for a service."""


async def _when_reachable(
    service: str,
    target: str,
    step: Callable[[], Awaitable[T]],
    transient: Callable[[BaseException], bool],
    stopping: asyncio.Event,
) -> T:
    """``step()``, tried again with capped backoff for as long as it fails in a way that
    waiting can cure (``transient``: refused, reset, timed out, starting up), each failure
    one warning line; anything else is raised. Raises :class:`_StoppedWhileWaiting` if
    ``stopping`` is set while it waits."""
    backoff = Backoff(STARTUP_RETRY_BASE_S, STARTUP_RETRY_CAP_S)
    while True:
        try:
            result = await step()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = backoff.next()
            log.warning(
                f"{service} not reachable yet, waiting",
                target=target,
                error=f"{type(exc).__name__}: {exc}",
                attempt=backoff.attempts,
                retry_in_s=round(delay, 2),
            )
            if await wait_any((stopping,), delay):
                raise _StoppedWhileWaiting(service) from None
            continue
        if backoff.attempts:
            log.info(f"{service} reachable", target=target, attempts=backoff.attempts + 1)
        return result


def _broker_transient(exc: BaseException) -> bool:
    """Refused, reset or timed out (the broker down, booting, or the network): worth
    waiting for. A channel error (topology arguments that differ) or a refused login is
    not."""
    if isinstance(exc, aio_pika.exceptions.ProbableAuthenticationError):
        return False  # a refused login is a ConnectionError too, but waiting will not cure it
    return isinstance(exc, (OSError, TimeoutError))


async def _migrate(settings: CentralSettings) -> list[str]:
    conn = await connect(settings)
    try:
        return await migrate(conn, lock_timeout=settings.migration_lock_timeout)
    finally:
        await conn.close()


class IngestService:
    """``workers`` ingest workers and one dead-letter worker over one pool."""

    def __init__(self, settings: CentralSettings, pool: asyncpg.Pool, *, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("at least one ingest worker")
        self.stats = IngestStats()
        self.ingest_workers = [
            IngestWorker(settings, pool, index=i, stats=self.stats) for i in range(workers)
        ]
        self.dead_letter_worker = DeadLetterWorker(settings, pool, stats=self.stats)

    @property
    def workers(self) -> Sequence[IngestWorker | DeadLetterWorker]:
        return [*self.ingest_workers, self.dead_letter_worker]

    async def run(self, stopping: asyncio.Event) -> None:
        """Until ``stopping`` is set; each worker reconnects on its own."""
        async with asyncio.TaskGroup() as group:
            for worker in self.workers:
                group.create_task(worker.run(stopping), name=worker.name)

    async def wait_consuming(self, timeout: float | None) -> None:
        """Until every worker consumes (raises ``TimeoutError`` after ``timeout``, if any)."""
        async with asyncio.timeout(timeout):
            for worker in self.workers:
                await worker.connected.wait()


class CentralService:
    """Everything ``tillsync-central run`` runs: ingest, the relay, the catalog RPC and
    presence."""

    def __init__(
        self,
        settings: CentralSettings,
        pool: asyncpg.Pool,
        *,
        workers: int = 1,
        rpc_workers: int = 1,
    ) -> None:
        if rpc_workers < 1:
            raise ValueError("at least one catalog RPC worker")
        self.ingest = IngestService(settings, pool, workers=workers)
        self.relay = Relay(settings)
        self.rpc_stats = RpcStats()
        self.rpc_workers = [
            CatalogRpcWorker(settings, pool, index=i, stats=self.rpc_stats)
            for i in range(rpc_workers)
        ]
        self.presence = PresenceWorker(settings, pool)
        self.reconciler = Reconciler(settings, pool)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def healthy(self) -> bool:
        """Every worker's loop still runs (each reconnects on its own, so a broker or
        database outage is not unhealthy: restarting would not cure it)."""
        return bool(self._tasks) and all(not task.done() for task in self._tasks)

    async def run(self, stopping: asyncio.Event) -> None:
        """Until ``stopping`` is set; each worker reconnects on its own."""
        async with asyncio.TaskGroup() as group:
            self._tasks = [
                group.create_task(self.ingest.run(stopping), name="ingest"),
                group.create_task(self.relay.run(stopping), name=self.relay.name),
                *(
                    group.create_task(worker.run(stopping), name=worker.name)
                    for worker in self.rpc_workers
                ),
                group.create_task(self.presence.run(stopping), name=self.presence.name),
                group.create_task(self.reconciler.run(stopping), name=self.reconciler.name),
            ]

    async def wait_consuming(self, timeout: float | None) -> None:
        """Until every consumer consumes (the relay may be a standby: not waited for)."""
        async with asyncio.timeout(timeout):
            await self.ingest.wait_consuming(timeout)
            for worker in self.rpc_workers:
                await worker.connected.wait()
            await self.presence.connected.wait()


async def declare(settings: CentralSettings) -> None:
    """Declare the shared topology over one short-lived connection, or with
    ``declare_topology`` off only check that it exists (``config_error`` if not)."""
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=15)
    async with connection:
        channel = await connection.channel()
        if settings.declare_topology:
            await declare_topology(channel)
            return
        try:
            await verify_topology(channel)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise ConfigError(
                f"the shared topology is incomplete ({exc}); declare it with "
                "`tillsync-central broker setup-users` or run once with declare_topology on",
                field="declare_topology",
            ) from exc


async def run(
    settings: CentralSettings,
    *,
    workers: int = 1,
    rpc_workers: int = 1,
    stopping: asyncio.Event | None = None,
    notifier: Notifier | None = None,
) -> IngestStats:
    """Migrate, declare, and run every worker until SIGTERM/SIGINT (or ``stopping``);
    returns the ingest counters after a clean stop. With a ``notifier`` (systemd), says
    ``READY=1`` once every consumer consumes, pings the watchdog while every worker loop
    runs, and says ``STOPPING=1`` on SIGTERM."""
    stopping = asyncio.Event() if stopping is None else stopping
    notifier = Notifier(None) if notifier is None else notifier
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def stop() -> None:
        notifier.stopping()
        stopping.set()

    for signum in signals:
        loop.add_signal_handler(signum, stop)
    database = redact_url(settings.database_url)
    amqp = redact_url(settings.amqp_url)
    try:
        try:
            applied = await _when_reachable(
                "PostgreSQL", database, lambda: _migrate(settings), is_transient, stopping
            )
            await _when_reachable(
                "RabbitMQ", amqp, lambda: declare(settings), _broker_transient, stopping
            )
            pool = await _when_reachable(
                "PostgreSQL", database, lambda: create_pool(settings), is_transient, stopping
            )
        except _StoppedWhileWaiting as waiting:
            log.info("central stopped before it started", waiting_for=str(waiting))
            return IngestStats()
        log.info(
            "central starting",
            workers=workers,
            rpc_workers=rpc_workers,
            migrations_applied=applied,
            amqp=amqp,
            database=database,
        )
        try:
            service = CentralService(settings, pool, workers=workers, rpc_workers=rpc_workers)
            consuming = asyncio.Event()

            async def ready_when_consuming() -> None:
                await service.wait_consuming(timeout=None)
                consuming.set()

            async with (
                serving_metrics(settings, service),
                serving_admin(settings, service),  # the dashboard: docs/admin.md
                asyncio.TaskGroup() as group,
            ):
                # Cancelled by the service's end if it never got that far.
                waiter = group.create_task(ready_when_consuming())
                run_task = group.create_task(
                    run_supervised(
                        service.run(stopping),
                        notifier,
                        started=consuming,
                        healthy=lambda: service.healthy,
                    )
                )
                run_task.add_done_callback(lambda _: waiter.cancel())
        finally:
            try:
                await asyncio.wait_for(pool.close(), timeout=POOL_CLOSE_TIMEOUT_S)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()
        log.info("central stopped", **vars(service.ingest.stats))
        log.info("catalog stopped", **vars(service.rpc_stats), relay=vars(service.relay.stats))
        log.info("presence stopped", **vars(service.presence.stats))
        log.info("reconciliation stopped", **vars(service.reconciler.stats))
        return service.ingest.stats
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
