"""Catalog sync: real-time changes, and the deltas and reinits (:mod:`delta_rpc`) that
fill every gap, one at a time, each recorded in ``sync_runs``.

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

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractExchange

from tillsync_protocol import (
    Backoff,
    CatalogChangeBody,
    DeltaEnd,
    DeltaPage,
    ReinitBody,
    TillsyncError,
)
from tillsync_protocol.codec import CheckedDeltaPage

from .delta_rpc import (
    DeltaRpc,
    NotConnectedError,
    ProgressCallback,
    SyncError,
    SyncProgress,
    SyncRequest,
)
from .history import History, SyncKind, SyncResult
from .outbox import now_ms
from .replica import ApplyMode, Replica
from .settings import AgentSettings

__all__ = [
    "CatalogSync",
    "NotConnectedError",
    "ProgressCallback",
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
        self._rpc = DeltaRpc(settings, replica, self._link_lost)
        self._holding = False
        self._held: list[CatalogChangeBody] = []
        self._incoming: list[tuple[CatalogChangeBody, asyncio.Future[None]]] = []
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
        """A real-time ``catalog_change``: applied, or held while a sync runs. Returns once
        it is committed (or held). Changes that arrive while others are being applied are
        applied together, in arrival order, in one transaction."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._incoming.append((change, waiter))  # before the first await: arrival order
        async with self._order:
            if not waiter.done():  # else an earlier caller took this change with its own
                batch, self._incoming = self._incoming, []
                try:
                    await self._take([c for c, _ in batch])
                except BaseException as exc:
                    for _, other in batch:
                        if other is waiter:
                            continue
                        if isinstance(exc, Exception):
                            other.set_exception(exc)
                        else:
                            other.cancel()
                    raise
                for _, other in batch:
                    other.set_result(None)
        waiter.result()

    async def _take(self, changes: list[CatalogChangeBody]) -> None:
        if self._holding:
            room = MAX_HELD - len(self._held)
            self._held.extend(changes[:room])
            if len(changes) > room:
                self._held_overflow = True
            return
        await self._apply(changes)

    def on_reply(self, reply: DeltaPage | CheckedDeltaPage | DeltaEnd) -> None:
        self._rpc.on_reply(reply)

    async def _apply(self, changes: list[CatalogChangeBody]) -> None:
        statuses = await self._replica.apply_changes(changes)
        for change, status in zip(changes, statuses, strict=True):
            if status == "gap":
                log.info("catalog gap", scope=change.scope, scope_seq=change.scope_seq)
                self.request_delta("gap")
                break

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
        try:
            end, foreign = await self._rpc.fetch(
                exchange, request, request_id, cursors, progress, lambda: _notify(job, progress)
            )
        except SyncError as exc:
            if exc.code == "cursor_ahead":
                # Our cursors come from another central database: only a snapshot helps.
                self._wanted_replace = True
            raise
        if foreign:
            errors.append(f"{foreign} change(s) of scopes this register does not follow left out")
        progress.phase = "applying"
        _notify(job, progress)
        applied = await self._replica.apply_staged(
            request_id,
            mode=request.mode,
            entities=request.replaced(),
            cursors=end.cursors if request.complete else None,
        )
        progress.applied = applied.applied
        return applied.cursors

    async def _release_held(self) -> None:
        """Re-check the real-time changes held during the sync, in order."""
        async with self._order:
            if self._held:
                held, self._held = self._held, []
                await self._apply(held)
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
