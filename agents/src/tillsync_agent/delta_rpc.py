"""The delta RPC, built from the topology and the codec (as aio-pika's ``patterns/rpc.py``
is built on its core): one ``delta_request`` out, its ``delta_page``s into the replica's
shadow, its ``delta_end`` back to the caller.

The request goes to ``tillsync.rpc`` with key ``rpc.<center>.<register>.delta``,
``reply_to`` = the register's queue and ``correlation_id`` = ``request_id``, on the link's
publish channel (publisher confirms, ``mandatory``, returns raise). The replies arrive in
the register's own queue (``reg.<register>.delta``) and are handed to :meth:`DeltaRpc.on_reply`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractExchange

from tillsync_protocol import (
    CONTENT_TYPE,
    CUSTOMER_ENTITIES,
    ENTITIES,
    DeltaEnd,
    DeltaEndBody,
    DeltaPage,
    DeltaRequest,
    DeltaRequestBody,
    InvalidValueError,
    TillsyncError,
    encode,
    topology,
)
from tillsync_protocol.codec import CheckedDeltaPage, without_collection

from .history import SyncKind
from .outbox import now_ms
from .replica import ApplyMode, NotStagedError, Replica, StagedPage
from .settings import AgentSettings

__all__ = [
    "DeltaRpc",
    "NotConnectedError",
    "ProgressCallback",
    "SyncError",
    "SyncProgress",
    "SyncRequest",
]

log = structlog.get_logger(__name__)

STAGE_PAGES_MAX = 8
"""Pages already received that are staged together, in one transaction."""


class NotConnectedError(TillsyncError):
    """A sync needs the broker and the link is down."""

    code = "not_connected"


class SyncError(TillsyncError):
    """A delta or reinit that did not complete (central's ``error_code``, a timeout, missing
    pages); its code is central's or ``sync_failed``."""

    code = "sync_failed"


@dataclass(frozen=True)
class SyncRequest:
    """What to ask central for: ``mode`` ``delta`` (changes after the cursors), ``update``
    or ``replace`` (a snapshot, upserted or swapped in)."""

    mode: ApplyMode = "delta"
    entities: tuple[str, ...] | None = None
    with_customers: bool = True
    trigger: str = "manual"

    def __post_init__(self) -> None:
        if self.mode not in ("delta", "update", "replace"):
            raise InvalidValueError(f"unknown sync mode {self.mode!r}", field="mode")
        unknown = sorted(set(self.entities or ()) - set(ENTITIES))
        if unknown:
            raise InvalidValueError(
                f"unknown catalog entities {unknown}; known: {', '.join(ENTITIES)}",
                field="entities",
            )

    @property
    def kind(self) -> SyncKind:
        return "catalog_delta" if self.mode == "delta" else "reinit"

    @property
    def complete(self) -> bool:
        """Whether the answer covers every entity, so the cursors may move to its end."""
        return self.entities is None and self.with_customers

    def replaced(self) -> list[str]:
        """Entities a replace swaps (all it asked for)."""
        chosen = self.entities if self.entities is not None else ENTITIES
        return [e for e in chosen if self.with_customers or e not in CUSTOMER_ENTITIES]


@dataclass
class SyncProgress:
    phase: Literal["requesting", "receiving", "applying", "done"] = "requesting"
    pages: int = 0
    received: int = 0
    applied: int = 0


ProgressCallback = Callable[[SyncProgress], None]


class DeltaRpc:
    """Delta requests of one register, and the replies they are waiting for."""

    def __init__(self, settings: AgentSettings, replica: Replica, link_lost: asyncio.Event) -> None:
        self._settings = settings
        self._replica = replica
        self._link_lost = link_lost
        self._replies: dict[str, asyncio.Queue[StagedPage | DeltaEnd]] = {}

    def on_reply(self, reply: DeltaPage | CheckedDeltaPage | DeltaEnd) -> None:
        """A reply to a request: a page (decoded, or checked as ``decode_control_pages``
        gives it) is turned into rows at once and waits for staging; the end waits as is."""
        request_id = (
            reply.request_id if isinstance(reply, CheckedDeltaPage) else reply.body.request_id
        )
        queue = self._replies.get(request_id)
        if queue is None:
            log.debug("reply to a request no longer waited for", request_id=request_id)
            return
        if not isinstance(reply, DeltaEnd):
            # Pages can arrive faster than they are staged: what waits is plain rows, not
            # thousands of models that every full garbage collection would walk. The rows
            # are made with the collector paused, as the page was decoded (see
            # without_collection: a page's rows are 3,000 tuples that all survive).
            try:
                page = reply if isinstance(reply, CheckedDeltaPage) else reply.body
                staged = without_collection(self._replica.shadow_rows, request_id, page)
            except NotStagedError as exc:  # the replica stages another request: not ours
                log.warning("reply to a request not being staged", error=str(exc))
                return
            queue.put_nowait(staged)
        else:
            queue.put_nowait(reply)

    async def fetch(
        self,
        exchange: AbstractExchange,
        request: SyncRequest,
        request_id: str,
        cursors: dict[str, int],
        progress: SyncProgress,
        notify: Callable[[], None],
    ) -> tuple[DeltaEndBody, int]:
        """Ask central and stage every page in the replica (what was staged is cleared first;
        a replace stages the next catalog itself, a delta or update the shadow); returns
        the ``delta_end`` and how many changes of scopes we do not follow were left out.

        Raises ``SyncError`` (central's ``error_code``, or an incomplete answer),
        ``NotConnectedError`` if the link goes down, ``TimeoutError`` if a reply is later
        than ``delta_timeout_s``.
        """
        await self._replica.begin_staging(request_id, request.mode)
        replies: asyncio.Queue[StagedPage | DeltaEnd] = asyncio.Queue()
        self._replies[request_id] = replies
        try:
            await self._publish(exchange, request, request_id, cursors)
            notify()
            return await self._collect(request_id, replies, progress, notify)
        finally:
            self._replies.pop(request_id, None)

    async def _publish(
        self,
        exchange: AbstractExchange,
        request: SyncRequest,
        request_id: str,
        cursors: dict[str, int],
    ) -> None:
        settings = self._settings
        delta = request.mode == "delta"
        body = DeltaRequestBody.model_validate(
            {
                "request_id": request_id,
                "register_id": settings.register_id,
                "center_id": settings.center_id,
                "mode": "delta" if delta else "snapshot",
                "cursors": {s: cursors.get(s, 0) for s in self._replica.scopes} if delta else {},
                "entities": None if request.entities is None else list(request.entities),
                "with_customers": request.with_customers,
                "page_size": settings.delta_page_size,
            }
        )
        message = DeltaRequest(msg_id=str(uuid.uuid4()), created_at=now_ms(), body=body)
        # Routing key of requests to central: rpc.<center>.<register>.<name> (topology.py).
        key = f"rpc.{settings.center_id}.{settings.register_id}.delta"
        confirm = await exchange.publish(
            aio_pika.Message(
                encode(message),
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.msg_id,
                type=message.type,
                user_id=settings.broker_user,
                correlation_id=request_id,
                reply_to=topology.register_queue(settings.register_id),
                app_id="tillsync-agent",
            ),
            key,
            mandatory=True,
            timeout=settings.publish_timeout_s,
        )
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise SyncError(f"the broker did not confirm the delta request ({confirm!r})")
        log.info(
            "delta requested",
            request_id=request_id,
            mode=message.body.mode,
            trigger=request.trigger,
            cursors=message.body.cursors,
        )

    async def _collect(
        self,
        request_id: str,
        replies: asyncio.Queue[StagedPage | DeltaEnd],
        progress: SyncProgress,
        notify: Callable[[], None],
    ) -> tuple[DeltaEndBody, int]:
        timeout = self._settings.delta_timeout_s
        pages: set[int] = set()
        foreign = 0
        while True:
            reply: StagedPage | DeltaEnd | None = await self._next_reply(replies, timeout)
            if isinstance(reply, StagedPage):
                # Pages that arrived meanwhile are staged with this one, in one commit (a
                # few at most: the write lock is shared with the POS app's submits).
                batch: list[StagedPage] = []
                while isinstance(reply, StagedPage):
                    if reply.page_no not in pages:  # else redelivered
                        pages.add(reply.page_no)
                        batch.append(reply)
                    more = len(batch) < STAGE_PAGES_MAX and not replies.empty()
                    reply = replies.get_nowait() if more else None
                if batch:
                    await self._replica.stage_rows(batch)
                    foreign += sum(page.foreign for page in batch)
                    progress.phase = "receiving"
                    progress.pages = len(pages)
                    progress.received += sum(page.changes for page in batch)
                    notify()
            if reply is None:
                continue
            end = reply.body
            if end.error_code is not None:
                raise SyncError(
                    end.error_reason or "central refused the request", code=end.error_code
                )
            if len(pages) != end.pages or progress.received != end.changes:
                raise SyncError(
                    f"incomplete answer: {len(pages)} of {end.pages} pages, "
                    f"{progress.received} of {end.changes} changes"
                )
            return end, foreign

    async def _next_reply(
        self, replies: asyncio.Queue[StagedPage | DeltaEnd], timeout: float
    ) -> StagedPage | DeltaEnd:
        getter = asyncio.ensure_future(replies.get())
        lost = asyncio.ensure_future(self._link_lost.wait())
        try:
            done, _ = await asyncio.wait(
                (getter, lost), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        if lost in done:
            raise NotConnectedError("the link to the broker went down during the sync")
        raise TimeoutError(f"no reply from central within {timeout:g} s")
