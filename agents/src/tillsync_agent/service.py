"""The agent as one object: ``async with Agent(settings) as agent: await agent.run()``.

It owns the store, the outbox, the link (sender and ack consumer) and the periodic sweep,
all in one ``asyncio.TaskGroup``. A POS app written in Python embeds it and calls
:meth:`Agent.submit`; other processes talk to it over its local socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import asdict
from types import TracebackType
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from tillsync_protocol import Ack, ProtocolError, ResendRequest, decode_control

from . import __version__
from .control_socket import ControlSocket
from .link import Link
from .outbox import Outbox, Submitted
from .sender import Sender
from .settings import AgentSettings
from .store import Store

__all__ = ["Agent"]

log = structlog.get_logger(__name__)


class Agent:
    def __init__(self, settings: AgentSettings, *, serve_socket: bool = True) -> None:
        self.settings = settings
        self._store = Store(settings.database_path)
        self.outbox = Outbox(
            self._store,
            register_id=settings.register_id,
            center_id=settings.center_id,
            resend_after_ms=int(settings.ack_timeout_s * 1000),
        )
        self._sender = Sender(settings, self.outbox)
        self.link = Link(settings, self._sender, self._on_message)
        self._socket = ControlSocket(settings.socket_path, self) if serve_socket else None
        self._stopping = asyncio.Event()

    async def __aenter__(self) -> Agent:
        await self._store.open()
        await self.outbox.load()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
        async with asyncio.TaskGroup() as group:
            group.create_task(self.link.run(self._stopping))
            group.create_task(self._sweep())
            if self._socket is not None:
                await self._socket.start()
                group.create_task(self._close_socket_on_stop())
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
        }

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
            control = decode_control(message.body)
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
        elif (
            isinstance(control, ResendRequest)
            and control.body.register_id == self.settings.register_id
        ):
            log.info(
                "central asked for a resend", first=control.body.from_seq, last=control.body.to_seq
            )
            await self.outbox.make_due(first=control.body.from_seq, last=control.body.to_seq)
        else:
            # Catalog changes and commands are handled by the catalog replica (issue #5).
            log.debug("message not handled by this agent version", type=control.type)
        await message.ack()
