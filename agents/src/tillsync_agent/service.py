"""The agent as one object: ``async with Agent(settings) as agent: await agent.run()``.

It owns the store, the outbox, the catalog replica, the link (sender and consumer), the
catalog sync, the documents sync (sweeps) and the local HTTP API, all in one
``asyncio.TaskGroup``. A POS app written in Python embeds it and calls
:meth:`Agent.submit`, reads the catalog through :attr:`Agent.replica` and follows it with
:meth:`Agent.catalog_changes`; other processes talk to it over its local socket, POS apps
in other languages over its HTTP API (:mod:`local_api`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from tillsync_protocol import (
    Ack,
    CatalogChange,
    DeltaEnd,
    DeltaPage,
    ProtocolError,
    Reinit,
    ResendRequest,
)
from tillsync_protocol.codec import CheckedDeltaPage, decode_control_pages
from tillsync_protocol.control import CatalogValue

from . import __version__
from .catalog_events import CatalogEvent, CatalogSubscription
from .catalog_sync import CatalogSync, ProgressCallback, SyncReport, SyncRequest
from .control_socket import ControlSocket
from .documents_sync import DocumentsSync
from .heartbeat import Heartbeats
from .history import History
from .link import Link
from .outbox import Outbox, Submitted
from .replica import Replica
from .sender import Sender
from .settings import AgentSettings
from .store import Store

if TYPE_CHECKING:
    from .local_api import LocalApi

__all__ = ["Agent"]

log = structlog.get_logger(__name__)


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        serve_socket: bool = True,
        sqlite_gate: asyncio.Semaphore | None = None,
    ) -> None:
        """``sqlite_gate``: for a process that hosts many agents (the benches, tests), one
        semaphore given to all of them bounds how many of their SQLite transactions run at
        once. Each agent's connection has its own thread; a thousand of them contending for
        the GIL cost several times the work itself (docs/agent.md). A till runs one agent
        per process and needs none."""
        self.settings = settings
        self._store = Store(settings.database_path, gate=sqlite_gate)
        self.outbox = Outbox(
            self._store,
            register_id=settings.register_id,
            center_id=settings.center_id,
            resend_after_ms=int(settings.ack_timeout_s * 1000),
        )
        self.replica = Replica(
            self._store,
            path=settings.database_path,
            center_id=settings.center_id,
            labels=settings.labels,
            queue_size=settings.catalog_queue_size,
        )
        """The catalog replica: ``item``, ``item_by_barcode``, ``search``, ``price``, ``get``,
        ``all`` (read-only, committed snapshots)."""
        self.history = History(self._store)
        self._sender = Sender(settings, self.outbox)
        self.link = Link(settings, self._sender, self._on_message)
        self.catalog_sync = CatalogSync(
            settings, self.replica, self.history, lambda: self.link.rpc_exchange
        )
        self.link.on_up.append(self.catalog_sync.link_up)
        self.link.on_down.append(self.catalog_sync.link_down)
        self.heartbeats = Heartbeats(
            settings,
            self.outbox,
            self.replica,
            self.history,
            exchange=lambda: self.link.presence_exchange,
            last_error=lambda: self.link.state.last_error or self._sender.stats.last_error,
        )
        self.link.on_up.append(self.heartbeats.link_up)
        self._socket = ControlSocket(settings.socket_path, self) if serve_socket else None
        self.documents_sync = DocumentsSync(settings, self.outbox, self.history, self.link)
        self.local_api: LocalApi | None = None
        """The HTTP API for POS apps, when ``api_port`` and ``api_token`` are set."""
        if settings.api_port and settings.api_token is not None:
            from .local_api import LocalApi  # starlette and uvicorn only where one serves

            self.local_api = LocalApi(self)
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self.started = asyncio.Event()
        """Set once :meth:`run` has started every loop and the local socket listens."""

    @property
    def healthy(self) -> bool:
        """Every loop of :meth:`run` is still running (what the systemd watchdog checks)."""
        return self.started.is_set() and all(not task.done() for task in self._loops)

    async def __aenter__(self) -> Agent:
        await self._store.open()
        try:
            await self.outbox.load()
            await self.history.load()
            await self.replica.open()
        except BaseException:
            await self._store.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.replica.close()
        await self._store.close()

    async def submit(self, doc_type: str, body: Mapping[str, Any]) -> Submitted:
        """Store a document durably; returns its seq and doc_id. Never waits on the network."""
        submitted = await self.outbox.submit(doc_type, body)
        log.debug(
            "document stored",
            register_id=self.settings.register_id,
            seq=submitted.seq,
            doc_id=submitted.doc_id,
            doc_type=doc_type,
        )
        return submitted

    def stop(self) -> None:
        """Ask :meth:`run` to drain in-flight work and return (what SIGTERM does)."""
        self._stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`: link (publish + acks), periodic sweep, local socket."""
        log.info(
            "agent starting",
            register_id=self.settings.register_id,
            center_id=self.settings.center_id,
            version=__version__,
            pending=self.outbox.counts.pending,
        )
        if self.local_api is not None:
            self.local_api.start()  # binds now: a port in use fails the start-up plainly
        async with asyncio.TaskGroup() as group:
            self._loops = [
                group.create_task(self.link.run(self._stopping)),
                group.create_task(self.documents_sync.run(self._stopping)),
                group.create_task(self.catalog_sync.run(self._stopping)),
                group.create_task(self.heartbeats.run(self._stopping)),
            ]
            if self._socket is not None:
                await self._socket.start()
                group.create_task(self._close_socket_on_stop())
            if self.local_api is not None:
                group.create_task(self.local_api.serve(self._stopping))
            # Last in this block: whatever a POS app talks to is listening by now.
            self.started.set()
        log.info(
            "agent stopped",
            register_id=self.settings.register_id,
            pending=self.outbox.counts.pending,
        )

    def status(self) -> dict[str, Any]:
        counts = self.outbox.counts
        stats = self._sender.stats
        return {
            "register_id": self.settings.register_id,
            "center_id": self.settings.center_id,
            "agent_version": __version__,
            "running": True,
            "connected": self.link.state.connected,
            "pending": counts.pending,
            "rejected": counts.rejected,
            "acknowledged": counts.acknowledged,
            "last_seq": counts.last_seq,
            "last_successful_send_at": stats.last_success_at,
            "last_error": self.link.state.last_error or stats.last_error,
            "link": asdict(self.link.state),
            "catalog": self.catalog_status(),
            "documents_sync": self.documents_sync.status(),
        }

    def catalog_status(self) -> dict[str, Any]:
        running = self.catalog_sync.running
        progress = self.catalog_sync.progress
        last = self.history.last_of("catalog_delta", "reinit")
        return {
            "sync_running": None if running is None else asdict(running),
            "progress": None if progress is None else asdict(progress),
            "last_sync": None if last is None else last.to_dict(),
        }

    # -- catalog ----------------------------------------------------------------------------

    def catalog_changes(self, maxsize: int | None = None) -> CatalogSubscription:
        """``async for event in agent.catalog_changes():`` every replica change committed
        from now on; a subscriber more than ``maxsize`` (``catalog_queue_size``) behind
        loses the oldest, counted in ``.dropped``."""
        return self.replica.subscribe(maxsize)

    def on_change(self, callback: Callable[[CatalogEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` after every replica commit; returns the unsubscriber."""
        return self.replica.on_change(callback)

    async def edit_item(self, item_id: str, changes: Mapping[str, CatalogValue]) -> Submitted:
        """Change an item here and now (``local_edit``) and send central an ``item_edit``
        document based on the replica's version, in one transaction. Central applies it if
        the item did not change meanwhile; else it rejects it (``edit_conflict``) and the
        replica converges to central's state by a delta."""
        submitted = await self.replica.edit_item(self.outbox, item_id, changes)
        log.info(
            "item edited",
            register_id=self.settings.register_id,
            seq=submitted.seq,
            doc_id=submitted.doc_id,
            item_id=item_id,
        )
        return submitted

    async def sync_catalog(
        self, entities: Sequence[str] | None = None, progress: ProgressCallback | None = None
    ) -> SyncReport:
        """Ask central for what changed since the cursors (only ``entities`` if given: then
        the changes are applied and the cursors stay). ``sync_busy`` if a sync runs."""
        request = SyncRequest(
            "delta", None if entities is None else tuple(entities), trigger="manual"
        )
        return await self.catalog_sync.sync(request, progress)

    async def reinit_catalog(
        self,
        mode: str,
        *,
        with_customers: bool = True,
        entities: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> SyncReport:
        """Reload the catalog from a snapshot: ``update`` upserts it, ``replace`` swaps it in
        (a kill midway leaves the old catalog). ``sync_busy`` if a sync runs."""
        request = SyncRequest(
            mode,  # type: ignore[arg-type]  # checked by SyncRequest
            None if entities is None else tuple(entities),
            with_customers,
            trigger="manual",
        )
        return await self.catalog_sync.sync(request, progress)

    async def _sweep(self) -> None:
        """Every ``sweep_interval_s``, everything not yet acknowledged is sent again."""
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(
                    self._stopping.wait(), timeout=self.settings.sweep_interval_s
                )
            except TimeoutError:
                log.info(
                    "sweep: resending unacknowledged documents", pending=self.outbox.counts.pending
                )
                await self.outbox.make_due()

    async def _close_socket_on_stop(self) -> None:
        await self._stopping.wait()
        if self._socket is not None:
            await self._socket.stop()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            # A delta page comes back checked but without its models (the same checks).
            control = decode_control_pages(message.body)
        except ProtocolError as exc:
            log.error(
                "undecodable message from central",
                error=str(exc),
                payload_hex=message.body[:256].hex(),
            )
            await message.ack()
            return
        if isinstance(control, Ack) and control.body.register_id == self.settings.register_id:
            acked, rejected = await self.outbox.apply_ack(control.body)
            for rejection in control.body.rejected:
                log.warning(
                    "document rejected by central",
                    register_id=self.settings.register_id,
                    seq=rejection.seq,
                    doc_id=rejection.doc_id,
                    code=rejection.code,
                    field=rejection.field,
                    reason=rejection.reason,
                )
            log.debug("ack", acked=acked, rejected=rejected, pending=self.outbox.counts.pending)
            if any(r.code == "edit_conflict" for r in control.body.rejected):
                # Central won: a delta brings its state of the item into the replica.
                self.catalog_sync.request_delta("edit_conflict")
        elif isinstance(control, CatalogChange):
            await self.catalog_sync.on_change(control.body)
        elif isinstance(control, (DeltaPage, CheckedDeltaPage, DeltaEnd)):
            self.catalog_sync.on_reply(control)
        elif isinstance(control, Reinit):
            self.catalog_sync.on_reinit_command(control.body)
        elif (
            isinstance(control, ResendRequest)
            and control.body.register_id == self.settings.register_id
        ):
            log.info(
                "central asked for a resend", first=control.body.from_seq, last=control.body.to_seq
            )
            await self.outbox.make_due(first=control.body.from_seq, last=control.body.to_seq)
        else:
            log.debug("message not handled by this agent version", type=control.type)
        await message.ack()
