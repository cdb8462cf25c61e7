"""Prometheus metrics of a central process: what ``/metrics`` serves.

:func:`build_registry` builds one :class:`MetricsRegistry` (a
``prometheus_client.CollectorRegistry``; no module-level registry) holding:

* the process counters of a :class:`~tillsync_central.runner.CentralService` (ingest,
  dead-letter worker, relay, catalog RPC, presence), read from its stats objects at each
  scrape, and the ingest batch latency histogram;
* fleet gauges read from PostgreSQL just before each scrape, with a short timeout and
  aggregate queries only: registers by state, pending and rejected documents from the
  latest heartbeats, relay lag per scope, stored dead letters and conflicts. When the
  database does not answer in time the scrape still answers, with
  ``tillsync_metrics_db_up 0`` and without the fleet gauges (stale values would mislead);
* the standard ``process_*`` and ``python_*`` collectors.

:mod:`tillsync_central.fleet_snapshot` holds the fleet queries.
:func:`metrics_app` is the ASGI app for ``GET /metrics`` (the admin API mounts it too), and
:func:`serving_metrics` serves it on its own listener inside ``tillsync-central run``
(settings ``metrics_host``, ``metrics_port``). Every metric is listed in
``docs/operations.md#metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import asyncpg
import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    make_asgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from .db.pool import init_connection
from .fleet_snapshot import FleetSnapshot, offline_after_s, read_fleet
from .http_server import embedded_server, listen
from .settings import CentralSettings

if TYPE_CHECKING:
    from .runner import CentralService

__all__ = [
    "MetricsRegistry",
    "build_registry",
    "metrics_app",
    "open_metrics_pool",
    "serving_metrics",
]

log = structlog.get_logger(__name__)

_POOL_CLOSE_TIMEOUT_S = 5.0
_SERVER_STOP_TIMEOUT_S = 5


class MetricsRegistry(CollectorRegistry):
    """A registry whose collectors may need to await something (a database) before a
    scrape: :func:`metrics_app` awaits :meth:`refresh` and then renders the registry."""

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def add_refresher(self, refresh: Callable[[], Awaitable[None]]) -> None:
        self._refreshers.append(refresh)

    async def refresh(self) -> None:
        """Run every refresher (each must bound its own time and never raise)."""
        await asyncio.gather(*(refresh() for refresh in self._refreshers))


class _FleetCollector(Collector):
    """The fleet gauges, from the snapshot the last :meth:`refresh` read."""

    def __init__(self, pool: asyncpg.Pool, offline_after: float, timeout: float) -> None:
        self._pool = pool
        self._offline_after = offline_after
        self._timeout = timeout
        self._snapshot: FleetSnapshot | None = None
        self._seconds = 0.0
        self._failing = False
        # One round of queries at a time, however many scrapes arrive together.
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            started = time.perf_counter()
            try:
                self._snapshot = await read_fleet(
                    self._pool, self._offline_after, timeout=self._timeout
                )
            except Exception as exc:  # whatever the database did, the scrape answers
                self._snapshot = None
                if not self._failing:  # once per outage, not at every scrape
                    log.warning("metrics: database gauges unavailable", error=_describe(exc))
                self._failing = True
            else:
                if self._failing:
                    log.info("metrics: database gauges available again")
                self._failing = False
            self._seconds = time.perf_counter() - started

    def collect(self) -> Iterable[Metric]:
        snapshot = self._snapshot
        yield _gauge(
            "tillsync_metrics_db_up",
            "1 if the fleet gauges were read from PostgreSQL at this scrape, else 0.",
            1 if snapshot is not None else 0,
        )
        yield _gauge(
            "tillsync_metrics_db_seconds",
            "Time the scrape-time database queries took (or waited before giving up).",
            self._seconds,
        )
        if snapshot is not None:
            yield from _fleet_metrics(snapshot)


def _fleet_metrics(snapshot: FleetSnapshot) -> Iterator[Metric]:
    yield _labelled(
        "tillsync_registers",
        "Registers per center by presence state (online: a heartbeat within three "
        "heartbeat intervals).",
        ["center", "state"],
        snapshot.registers.items(),
    )
    yield _labelled(
        "tillsync_registers_pending_documents",
        "Documents not yet acknowledged, as each register reported in its latest heartbeat.",
        ["center", "state"],
        snapshot.pending.items(),
    )
    yield _labelled(
        "tillsync_registers_rejected_documents",
        "Documents central rejected, as each register reported in its latest heartbeat.",
        ["center", "state"],
        snapshot.rejected.items(),
    )
    yield _gauge(
        "tillsync_registers_with_holes",
        "Registers with a gap in their stored seqs (a resend should close it).",
        snapshot.registers_with_holes,
    )
    yield _labelled(
        "tillsync_relay_lag_changes",
        "Catalog changes committed but not yet published by the relay, per scope.",
        ["scope"],
        (((scope,), value) for scope, value in snapshot.relay_lag.items()),
    )
    yield _labelled(
        "tillsync_relay_lag_seconds",
        "Age of the oldest catalog change the relay has not published, per scope (0: none).",
        ["scope"],
        (((scope,), value) for scope, value in snapshot.relay_lag_seconds.items()),
    )
    yield _labelled(
        "tillsync_dead_letters",
        "Dead letters stored, by source, code and status (new, replayed, discarded).",
        ["source", "code", "status"],
        snapshot.dead_letters.items(),
    )
    yield _labelled(
        "tillsync_conflicts",
        "Document conflicts stored, by kind (content, doc_id) and resolution.",
        ["kind", "resolution"],
        snapshot.conflicts.items(),
    )
    yield _labelled(
        "tillsync_catalog_conflicts",
        "Register item edits central did not apply, by code.",
        ["code"],
        (((code,), value) for code, value in snapshot.catalog_conflicts.items()),
    )


class _ProcessCounters(Collector):
    """The counters of one central process's workers since it started."""

    def __init__(self, service: CentralService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        ingest = self._service.ingest.stats
        relay = self._service.relay
        rpc = self._service.rpc_stats
        presence = self._service.presence.stats
        counters: list[tuple[str, str, float]] = [
            ("tillsync_ingest_batches", "Batches committed by the ingest workers.", ingest.batches),
            (
                "tillsync_ingest_deliveries",
                "Deliveries from tillsync.ingest handled (stored, duplicate, conflict or refused).",
                ingest.deliveries,
            ),
            (
                "tillsync_ingest_documents",
                "Documents in those deliveries (a document_batch counts each of its documents).",
                ingest.documents,
            ),
            ("tillsync_ingest_stored", "New documents stored.", ingest.stored),
            (
                "tillsync_ingest_duplicates",
                "Documents already stored with the same bytes (acknowledged again).",
                ingest.duplicates,
            ),
            (
                "tillsync_ingest_conflicts",
                "Documents whose key or doc_id was stored with other bytes.",
                ingest.conflicts,
            ),
            (
                "tillsync_ingest_refused",
                "Deliveries refused by ingest, each kept as a dead letter (source ingest).",
                ingest.refused,
            ),
            ("tillsync_ingest_acks_published", "Ack messages published.", ingest.acks_published),
            (
                "tillsync_ingest_loyalty_posted",
                "Loyalty accruals and redemptions posted to customers' balances.",
                ingest.loyalty_posted,
            ),
            (
                "tillsync_ingest_dead_lettered_by_broker",
                "Messages the broker dead-lettered after the delivery limit, kept as dead "
                "letters (code delivery_limit).",
                ingest.dead_lettered_by_broker,
            ),
            ("tillsync_relay_published", "Catalog changes published.", relay.stats.published),
            ("tillsync_relay_batches", "Relay batches published.", relay.stats.batches),
            (
                "tillsync_relay_sessions",
                "Times this process's relay became the active one.",
                relay.stats.sessions,
            ),
            ("tillsync_rpc_requests", "Catalog delta requests received.", rpc.requests),
            ("tillsync_rpc_answered", "Catalog delta requests answered.", rpc.answered),
            (
                "tillsync_rpc_refused",
                "Catalog delta requests refused (kept as dead letters).",
                rpc.refused,
            ),
            ("tillsync_rpc_pages", "Delta pages sent.", rpc.pages),
            ("tillsync_rpc_changes", "Catalog changes sent in delta pages.", rpc.changes),
            ("tillsync_heartbeats", "Heartbeats received.", presence.heartbeats),
            ("tillsync_heartbeats_stored", "Heartbeats stored.", presence.stored),
            (
                "tillsync_heartbeats_refused",
                "Heartbeats refused (kept as dead letters, source presence).",
                presence.refused,
            ),
        ]
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        item_edits = CounterMetricFamily(
            "tillsync_ingest_item_edits",
            "Register item edits applied or refused by ingest.",
            labels=["result"],
        )
        item_edits.add_metric(["applied"], ingest.item_edits_applied)
        item_edits.add_metric(["refused"], ingest.item_edits_refused)
        yield item_edits
        retries = CounterMetricFamily(
            "tillsync_db_retries",
            "Database steps retried after a transient failure, by flow.",
            labels=["flow"],
        )
        retries.add_metric(["ingest"], ingest.db_retries)
        retries.add_metric(["rpc"], rpc.db_retries)
        retries.add_metric(["presence"], presence.db_retries)
        yield retries
        yield _gauge(
            "tillsync_relay_active",
            "1 while this process's relay holds the lock and publishes (one process does).",
            1 if relay.active.is_set() else 0,
        )
        yield _gauge(
            "tillsync_workers_healthy",
            "1 while every worker loop of this process runs.",
            1 if self._service.healthy else 0,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _labelled(
    name: str,
    documentation: str,
    labels: list[str],
    values: Iterable[tuple[tuple[str, ...], float]],
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values):
        family.add_metric(list(key), value)
    return family


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


def build_registry(
    pool: asyncpg.Pool | None,
    settings: CentralSettings,
    *,
    service: CentralService | None = None,
    db_timeout: float | None = None,
    process: bool = True,
) -> MetricsRegistry:
    """A new registry for one process: ``service``'s counters and batch histogram (if
    given), the fleet gauges read through ``pool`` at each scrape (if given), and the
    ``process_*``/``python_*`` collectors (unless ``process`` is False)."""
    registry = MetricsRegistry()
    if service is not None:
        registry.register(_ProcessCounters(service))
        registry.register(service.ingest.stats.batch_seconds)
    if pool is not None:
        timeout = settings.metrics_db_timeout_s if db_timeout is None else db_timeout
        fleet = _FleetCollector(pool, offline_after_s(settings), timeout)
        registry.register(fleet)
        registry.add_refresher(fleet.refresh)
    if process:
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
    return registry


def metrics_app(registry: CollectorRegistry) -> ASGIApp:
    """The ASGI app answering any GET with the registry in Prometheus' text format
    (OpenMetrics when asked); a :class:`MetricsRegistry` is refreshed first."""
    exposition = make_asgi_app(registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan or websocket here
        if isinstance(registry, MetricsRegistry):
            await registry.refresh()
        await exposition(scope, receive, send)

    return app


async def open_metrics_pool(settings: CentralSettings) -> asyncpg.Pool:
    """A small pool of its own, so that a scrape never waits behind the workers (and
    never takes their connections); it connects on the first scrape."""
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=0,
        max_size=2,
        timeout=settings.db_connect_timeout,
        command_timeout=settings.metrics_db_timeout_s,
        init=init_connection,
    )
    assert pool is not None  # asyncpg types the result as optional
    return pool


@contextlib.asynccontextmanager
async def serving_metrics(
    settings: CentralSettings, service: CentralService | None = None
) -> AsyncIterator[int | None]:
    """Serve ``/metrics`` on ``metrics_host:metrics_port`` while the block runs; yields
    the port, or None when ``metrics_port`` is unset or 0 (nothing served). Raises
    ``ConfigError`` when the address cannot be bound."""
    if not settings.metrics_port:
        yield None
        return
    sock = listen(
        settings.metrics_host,
        settings.metrics_port,
        setting="metrics_port",
        what="the metrics endpoint",
    )
    pool: asyncpg.Pool | None = None
    try:
        pool = await open_metrics_pool(settings)
        app = metrics_app(build_registry(pool, settings, service=service))
        server = embedded_server(app, shutdown_timeout=_SERVER_STOP_TIMEOUT_S)
        async with asyncio.TaskGroup() as group:
            group.create_task(server.serve(sockets=[sock]), name="metrics")
            log.info("metrics listening", host=settings.metrics_host, port=settings.metrics_port)
            try:
                yield settings.metrics_port
            finally:
                server.should_exit = True
    finally:
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=_POOL_CLOSE_TIMEOUT_S)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()
        sock.close()
