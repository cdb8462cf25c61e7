"""Documents sync: the resend sweeps of unacknowledged documents, each recorded in
``sync_runs`` (kind ``documents``).

A sweep takes the documents stored up to now and not yet answered by central, makes them
due (the sender publishes them at once) and waits for central's answers while they keep
coming (at most ``ack_timeout_s + publish_timeout_s`` without progress). Its result:

* **successful** — every one of them acknowledged (or there was nothing to send);
* **partially_successful** — central rejected some (each in the error log), or some were
  still unanswered when the answers stopped coming;
* **failed** — the link to the broker is down (the documents wait, and go as soon as it is
  back), or not one answer came.

Sweeps run at start-up (once the link is up: connecting already resent everything, so the
sweep only watches), every ``sweep_interval_s``, and on demand (:meth:`DocumentsSync.sweep`,
the local API's ``POST /v1/sync/documents``). One at a time: asked for while one runs, a
sweep is refused with ``sync_busy``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from .catalog_sync import NotConnectedError, SyncBusyError
from .history import History, SyncResult, SyncRun
from .link import CONNECT_TIMEOUT_S, Link
from .outbox import Outbox, now_ms
from .settings import AgentSettings

__all__ = ["DocumentsSync"]

log = structlog.get_logger(__name__)

POLL_S = 0.2
"""How often a sweep re-counts its open documents (an indexed count)."""
MAX_LOGGED_REJECTIONS = 100


@dataclass
class _Job:
    trigger: str
    make_due: bool
    done: asyncio.Future[SyncRun] | None = None


class DocumentsSync:
    """Runs the sweeps, one at a time, in :meth:`run`."""

    def __init__(
        self, settings: AgentSettings, outbox: Outbox, history: History, link: Link
    ) -> None:
        self._settings = settings
        self._outbox = outbox
        self._history = history
        self._link = link
        self._link_up = asyncio.Event()
        link.on_up.append(self._link_up.set)
        self._wanted: _Job | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        self.running: str | None = None
        """The trigger of the sweep running now, if one runs."""

    def status(self) -> dict[str, object]:
        last = self._history.last_of("documents")
        return {
            "sync_running": self.running,
            "last_sync": None if last is None else last.to_dict(),
        }

    async def sweep(self) -> SyncRun:
        """Sweep now and return its run once it ended; ``sync_busy`` if one runs."""
        if self._stopped:
            raise NotConnectedError("the agent is stopping", field="documents")
        if self.running is not None or self._wanted is not None:
            raise SyncBusyError(
                f"a documents sync is already running ({self.running or 'manual'}); try "
                "again when it has finished",
                field="documents",
            )
        done: asyncio.Future[SyncRun] = asyncio.get_running_loop().create_future()
        self._wanted = _Job("manual", make_due=True, done=done)
        self._wake.set()
        # Shielded: a client that goes away does not cancel the sweep half-way.
        return await asyncio.shield(done)

    async def run(self, stopping: asyncio.Event) -> None:
        """The start-up sweep, then one every ``sweep_interval_s`` and those asked for."""
        await _wait_any((self._link_up, stopping), CONNECT_TIMEOUT_S + 1)
        next_at = time.monotonic()
        first: _Job | None = _Job("start-up", make_due=False)
        while not stopping.is_set():
            job, first = first or self._take(), None
            if job is None and time.monotonic() >= next_at:
                job = _Job("periodic", make_due=True)
            if job is not None:
                if job.trigger != "manual":
                    next_at = time.monotonic() + self._settings.sweep_interval_s
                await self._run_job(job, stopping)
                continue
            await _wait_any((self._wake, stopping), max(0.01, next_at - time.monotonic()))
            self._wake.clear()
        self._stopped = True
        job = self._take()
        if job is not None and job.done is not None and not job.done.done():
            await self._run_job(job, stopping)

    def _take(self) -> _Job | None:
        job, self._wanted = self._wanted, None
        return job

    async def _run_job(self, job: _Job, stopping: asyncio.Event) -> None:
        self.running = job.trigger
        try:
            run = await self._sweep(job, stopping)
        except BaseException as exc:
            if job.done is not None and not job.done.done():
                job.done.set_exception(exc)
            raise
        finally:
            self.running = None
        if job.done is not None and not job.done.done():
            job.done.set_result(run)

    async def _sweep(self, job: _Job, stopping: asyncio.Event) -> SyncRun:
        started = now_ms()
        last_seq = self._outbox.counts.last_seq
        first, count = await self._outbox.open_through(last_seq)
        detail: dict[str, object] = {"trigger": job.trigger, "last_seq": last_seq}
        run_id = await self._history.start("documents", detail)
        errors: list[str] = []
        answered = sent = 0
        rejected: list[dict[str, object]] = []
        if first is not None and job.make_due:
            # Also while the link is down: they go the moment it is back.
            await self._outbox.make_due(first=first, last=last_seq)
        if first is None:
            result: SyncResult = "successful"
        elif not self._link.state.connected:
            result = "failed"
            errors.append(f"not connected: {self._link.state.last_error or 'the link is down'}")
        else:
            sent = count
            remaining = await self._wait_for_answers(first, last_seq, count, stopping)
            answered = count - remaining
            rejected = await self._outbox.rejected_between(
                first, last_seq, started, MAX_LOGGED_REJECTIONS
            )
            errors.extend(_rejection(r) for r in rejected)
            if remaining:
                link = "connected" if self._link.state.connected else "the link is down"
                errors.append(
                    f"{remaining} of {count} document(s) not answered by central yet ({link})"
                )
            if remaining == count:
                result = "failed"
            elif remaining or rejected:
                result = "partially_successful"
            else:
                result = "successful"
        run = await self._history.finish(
            run_id,
            kind="documents",
            started_at=started,
            result=result,
            sent=sent,
            received=answered,
            errors=errors,
            detail={**detail, "first_seq": first, "rejected": len(rejected)},
        )
        log.info(
            "documents sync finished",
            register_id=self._settings.register_id,
            trigger=job.trigger,
            result=result,
            sent=run.sent,
            received=answered,
            errors=len(errors),
        )
        return run

    async def _wait_for_answers(
        self, first: int, last: int, count: int, stopping: asyncio.Event
    ) -> int:
        """Wait while central's answers keep coming; returns how many are still open."""
        idle = self._settings.ack_timeout_s + self._settings.publish_timeout_s
        remaining = count
        deadline = time.monotonic() + idle
        while remaining and not stopping.is_set() and time.monotonic() < deadline:
            await _wait_any((stopping,), POLL_S)
            now_open = await self._outbox.open_between(first, last)
            if now_open < remaining:
                deadline = time.monotonic() + idle
            remaining = now_open
        return remaining


def _rejection(row: dict[str, object]) -> str:
    field = f" {row['field']}" if row.get("field") else ""
    return (
        f"seq {row['seq']} ({row['doc_type']}, {row['doc_id']}) rejected: "
        f"{row['code']}{field}: {row['reason']}"
    )


async def _wait_any(events: Sequence[asyncio.Event], timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
