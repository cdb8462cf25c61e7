"""Catalog sync: real-time changes, and the delta RPC that fills every gap.

The delta RPC is built from the topology and the codec (as aio-pika's ``patterns/rpc.py``
is built on its core): a ``delta_request`` on ``tillsync.rpc`` with key
``rpc.<center>.<register>.delta``, ``reply_to`` = the register's queue and
``correlation_id`` = ``request_id``, published with a confirm; ``delta_page``s and one
``delta_end`` come back in the register's own queue (``reg.<register>.delta``) and are
handed here by :meth:`Agent._on_message`.

One sync runs at a time, in :meth:`CatalogSync.run`. Deltas asked for automatically (start-
up, every reconnect, a gap, the periodic check, an ``edit_conflict``) are coalesced into
one; a ``reinit`` command from central is queued; a sync asked for by hand while another
runs is refused with ``sync_busy``. Central's ``cursor_ahead`` (our cursors are past its
changelog: another central database) is answered by a replace from a snapshot. While a
sync runs, real-time changes are held and re-checked after it: those it already covered
are duplicates then.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractExchange

from tillsync_protocol import (
    CONTENT_TYPE,
    CUSTOMER_ENTITIES,
    ENTITIES,
    Backoff,
    CatalogChangeBody,
    DeltaEnd,
    DeltaPage,
    DeltaRequest,
    DeltaRequestBody,
    InvalidValueError,
    ReinitBody,
    TillsyncError,
    encode,
    topology,
)

from .history import History, SyncKind, SyncResult
from .outbox import now_ms
from .replica import ApplyMode, Replica
from .settings import AgentSettings

__all__ = [
    "CatalogSync",
    "NotConnectedError",
    "SyncBusyError",
    "SyncError",
    "SyncProgress",
    "SyncReport",
    "SyncRequest",
]

log = structlog.get_logger(__name__)

MAX_HELD = 10_000
"""Real-time changes held while a sync runs; past this they are dropped and a delta after
the sync recovers them."""
MAX_COMMANDS = 8


class SyncBusyError(TillsyncError):
    """A sync was asked for while another one runs."""

    code = "sync_busy"


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


@dataclass(frozen=True)
class SyncReport:
    """How one delta or reinit ended (also a row of ``sync_runs``)."""

    run_id: int
    kind: SyncKind
    mode: ApplyMode
    trigger: str
    result: SyncResult
    pages: int
    received: int
    applied: int
    cursors: dict[str, int]
    duration_ms: int
    errors: list[str] = field(default_factory=list)

    @property
    def nothing_new(self) -> bool:
        return self.result == "successful" and self.received == 0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "nothing_new": self.nothing_new}


ProgressCallback = Callable[[SyncProgress], None]


@dataclass
class _Job:
    request: SyncRequest
    progress: ProgressCallback | None = None
    done: asyncio.Future[SyncReport] | None = None


class CatalogSync:
    """Keeps the replica in step with central; one sync at a time."""

    def __init__(
        self,
        settings: AgentSettings,
        replica: Replica,
        history: History,
        rpc_exchange: Callable[[], AbstractExchange | None],
    ) -> None:
        self._settings = settings
        self._replica = replica
        self._history = history
        self._rpc_exchange = rpc_exchange
        self._current: _Job | None = None
        self._wanted_delta: str | None = None
        self._wanted_replace = False
        self._commands: deque[ReinitBody] = deque(maxlen=MAX_COMMANDS)
        self._seen_commands: deque[str] = deque(maxlen=64)
        self._wake = asyncio.Event()
        self._link_lost = asyncio.Event()
        self._replies: dict[str, asyncio.Queue[DeltaPage | DeltaEnd]] = {}
        self._holding = False
        self._held: list[CatalogChangeBody] = []
        self._held_overflow = False
        self._order = asyncio.Lock()
        self._retry = Backoff(settings.retry_base_s, settings.retry_cap_s)
        self._retry_at: float | None = None
        self._connected_once = False
        self.progress: SyncProgress | None = None
        """The running sync's progress, if one runs."""

    @property
    def running(self) -> SyncRequest | None:
        return None if self._current is None else self._current.request

    # -- triggers -----------------------------------------------------------------------

    def link_up(self) -> None:
        self._link_lost.clear()
        self.request_delta("reconnect" if self._connected_once else "start-up")
        self._connected_once = True

    def link_down(self) -> None:
        self._link_lost.set()

    def request_delta(self, trigger: str) -> None:
        """Ask for a delta soon (coalesced with any already asked for)."""
        if self._wanted_delta is None:
            self._wanted_delta = trigger
        self._wake.set()

    def on_reinit_command(self, command: ReinitBody) -> None:
        """A ``reinit`` from central: queued, run after the current sync (once per id)."""
        if command.command_id in self._seen_commands:
            return
        self._seen_commands.append(command.command_id)
        self._commands.append(command)
        log.info(
            "reinit asked by central",
            command_id=command.command_id,
            mode=command.mode,
            requested_by=command.requested_by,
        )
        self._wake.set()

    async def sync(
        self,
        request: SyncRequest,
        progress: ProgressCallback | None = None,
    ) -> SyncReport:
        """Run ``request`` now and return its report; ``sync_busy`` if a sync runs.

        A failed sync is reported (``result`` ``failed``, with its errors), not raised.
        """
        if self._current is not None:
            running = self._current.request
            raise SyncBusyError(
                f"a sync is already running ({running.kind}, {running.trigger}); try again "
                "when it has finished"
            )
        done: asyncio.Future[SyncReport] = asyncio.get_running_loop().create_future()
        self._current = _Job(request, progress, done)
        self._wake.set()
        # Shielded: a client that goes away does not cancel a sync half-way.
        return await asyncio.shield(done)

    # -- what arrives in the register's queue -------------------------------------------

    async def on_change(self, change: CatalogChangeBody) -> None:
        """A real-time ``catalog_change``: applied, or held while a sync runs."""
        async with self._order:  # the first await: changes keep their arrival order
            if self._holding:
                if len(self._held) < MAX_HELD:
                    self._held.append(change)
                else:
                    self._held_overflow = True
                return
            await self._apply(change)

    def on_reply(self, reply: DeltaPage | DeltaEnd) -> None:
        queue = self._replies.get(reply.body.request_id)
        if queue is None:
            log.debug("reply to a request no longer waited for", request_id=reply.body.request_id)
            return
        queue.put_nowait(reply)

    async def _apply(self, change: CatalogChangeBody) -> None:
        status = await self._replica.apply_change(change)
        if status == "gap":
            log.info("catalog gap", scope=change.scope, scope_seq=change.scope_seq)
            self.request_delta("gap")

    # -- the loop -----------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Run syncs one at a time until ``stopping``; checks every
        ``catalog_check_interval_s`` that nothing was missed."""
        interval = self._settings.catalog_check_interval_s
        next_check = time.monotonic() + interval
        while not stopping.is_set():
            job = self._next_job()
            if job is not None:
                await self._run_job(job)
                continue
            now = time.monotonic()
            deadline = min(next_check, self._retry_at or next_check)
            await _wait_any((self._wake, stopping), max(0.01, deadline - now))
            self._wake.clear()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + interval
                if self._rpc_exchange() is not None:
                    self.request_delta("periodic check")
            if self._retry_at is not None and now >= self._retry_at:
                self._retry_at = None
                self.request_delta("retry")
        if self._current is not None and self._current.done and not self._current.done.done():
            self._current.done.set_exception(NotConnectedError("the agent is stopping"))

    def _next_job(self) -> _Job | None:
        if self._current is not None:
            return self._current
        if self._rpc_exchange() is None:
            return None  # automatic syncs wait for the link
        if self._commands:
            command = self._commands.popleft()
            entities = None if command.entities is None else tuple(command.entities)
            request = SyncRequest(
                command.mode, entities, command.with_customers, f"central {command.command_id}"
            )
        elif self._wanted_replace:
            self._wanted_replace = False
            self._wanted_delta = None
            request = SyncRequest("replace", trigger="cursor_ahead")
        elif self._wanted_delta is not None:
            request = SyncRequest("delta", trigger=self._wanted_delta)
            self._wanted_delta = None
        else:
            return None
        self._current = _Job(request)
        return self._current

    async def _run_job(self, job: _Job) -> None:
        try:
            report = await self._execute(job)
        except BaseException as exc:
            if job.done is not None and not job.done.done():
                job.done.set_exception(exc)
            raise
        finally:
            self._current = None
            self.progress = None
        if report.result == "failed":
            self._retry_at = time.monotonic() + self._retry.next()
        else:
            self._retry.reset()
            self._retry_at = None
        if job.done is not None and not job.done.done():
            job.done.set_result(report)

    async def _execute(self, job: _Job) -> SyncReport:
        request = job.request
        progress = self.progress = SyncProgress()
        detail: dict[str, object] = {
            "trigger": request.trigger,
            "mode": request.mode,
            "entities": list(request.entities) if request.entities is not None else None,
            "with_customers": request.with_customers,
        }
        started = now_ms()
        run_id = await self._history.start(request.kind, detail)
        errors: list[str] = []
        cursors = await self._replica.cursors()
        request_id = str(uuid.uuid4())
        self._holding = True
        completed = False
        try:
            cursors = await self._exchange(job, request_id, progress, errors, cursors)
            completed = True
        except Exception as exc:  # any failure is the run's result, never the agent's end
            errors.append(_describe(exc))
            if not isinstance(exc, (TillsyncError, TimeoutError, aiormq.exceptions.AMQPError)):
                log.exception("catalog sync failed unexpectedly", request_id=request_id)
        finally:
            self._replies.pop(request_id, None)
        result: SyncResult = "successful"
        if not completed:
            result = "failed"
        elif errors:
            result = "partially_successful"
        progress.phase = "done"
        _notify(job, progress)
        run = await self._history.finish(
            run_id,
            kind=request.kind,
            started_at=started,
            result=result,
            sent=1,
            received=progress.received,
            errors=errors,
            detail={
                **detail,
                "pages": progress.pages,
                "applied": progress.applied,
                "cursors": cursors,
            },
        )
        await self._release_held()
        report = SyncReport(
            run_id=run_id,
            kind=request.kind,
            mode=request.mode,
            trigger=request.trigger,
            result=result,
            pages=progress.pages,
            received=progress.received,
            applied=progress.applied,
            cursors=cursors,
            duration_ms=(run.finished_at or started) - started,
            errors=errors,
        )
        log.info("catalog sync finished", **report.to_dict())
        return report

    async def _exchange(
        self,
        job: _Job,
        request_id: str,
        progress: SyncProgress,
        errors: list[str],
        cursors: dict[str, int],
    ) -> dict[str, int]:
        """Ask, collect into the shadow, apply at ``delta_end``; returns the cursors."""
        request = job.request
        exchange = self._rpc_exchange()
        if exchange is None:
            raise NotConnectedError("the link to the broker is down; the sync needs it")
        await self._replica.begin_staging()
        replies: asyncio.Queue[DeltaPage | DeltaEnd] = asyncio.Queue()
        self._replies[request_id] = replies
        await self._publish(exchange, request, request_id, cursors)
        _notify(job, progress)
        end = await self._collect(job, request_id, replies, progress, errors)
        progress.phase = "applying"
        _notify(job, progress)
        applied = await self._replica.apply_staged(
            request_id,
            mode=request.mode,
            entities=request.replaced(),
            cursors=end.body.cursors if request.complete else None,
        )
        progress.applied = applied.applied
        return applied.cursors

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
        job: _Job,
        request_id: str,
        replies: asyncio.Queue[DeltaPage | DeltaEnd],
        progress: SyncProgress,
        errors: list[str],
    ) -> DeltaEnd:
        timeout = self._settings.delta_timeout_s
        pages: set[int] = set()
        foreign = 0
        while True:
            reply = await self._next_reply(replies, timeout)
            if isinstance(reply, DeltaPage):
                if reply.body.page_no in pages:
                    continue  # redelivered
                pages.add(reply.body.page_no)
                foreign += await self._replica.stage(request_id, reply.body)
                progress.phase = "receiving"
                progress.pages = len(pages)
                progress.received += len(reply.body.changes)
                _notify(job, progress)
                continue
            end = reply.body
            if end.error_code == "cursor_ahead":
                # Our cursors come from another central database: only a snapshot helps.
                self._wanted_replace = True
            if end.error_code is not None:
                raise SyncError(
                    end.error_reason or "central refused the request", code=end.error_code
                )
            if len(pages) != end.pages or progress.received != end.changes:
                raise SyncError(
                    f"incomplete answer: {len(pages)} of {end.pages} pages, "
                    f"{progress.received} of {end.changes} changes"
                )
            if foreign:
                errors.append(
                    f"{foreign} change(s) of scopes this register does not follow left out"
                )
            return reply

    async def _next_reply(
        self, replies: asyncio.Queue[DeltaPage | DeltaEnd], timeout: float
    ) -> DeltaPage | DeltaEnd:
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

    async def _release_held(self) -> None:
        """Re-check the real-time changes held during the sync, in order."""
        async with self._order:
            while self._held:
                await self._apply(self._held.pop(0))
            if self._held_overflow:
                self._held_overflow = False
                self.request_delta("changes dropped during a sync")
            self._holding = False


def _notify(job: _Job, progress: SyncProgress) -> None:
    if job.progress is not None:
        try:
            job.progress(progress)
        except Exception as exc:  # a progress display must not break the sync
            log.warning("sync progress callback failed", error=repr(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TillsyncError):
        return str(exc)
    if isinstance(exc, aio_pika.exceptions.PublishError):
        return "unroutable: the broker returned the delta request (no queue for its key)"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    return f"{type(exc).__name__}: {exc}"


async def _wait_any(events: Sequence[asyncio.Event], timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
