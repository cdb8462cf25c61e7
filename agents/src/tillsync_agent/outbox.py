"""The outbox: every document a register produced, with its dense ``seq`` and its state.

pending → published → acknowledged, or rejected (with central's code and reason). The
counts (``pending`` = not yet acknowledged nor rejected) live in a ``counters`` row that
the same transaction updates, so they are exact at every moment and O(1) to read.

Submits that arrive together are committed together ("group commit"): one drainer task
writes every queued submit in one transaction, and each caller gets its own result or its
own error. Central's acks queue for the same drainer and ride in the same transaction as
the submits they meet: under load, a register writes one transaction per round trip to
its SQLite thread instead of one per submit batch plus one per ack (each transaction
queues behind the one before it on the one writer connection; docs/performance.md).

The sender's round costs as few trips to the SQLite thread as it can (each costs a thread
and an event-loop wake-up; docs/performance.md, "Fourth session"):

* :meth:`take_due` hands the sender the rows committed since its last look straight from
  memory (the outbox has their payloads at submit time) as long as nothing older can be
  due: it reads the table only after :meth:`make_due`, a shift close, an overflow, or
  when the earliest resend time it knows of has come.
* :meth:`mark_published` writes nothing at once: the records ride in the next
  transaction that takes the write lock (central's ack, a submit, the next table read),
  applied *before* that transaction's own statements, or after ``MARKS_FLUSH_S`` in one
  of their own committed with ``synchronous=NORMAL``. Losing them (a crash, a power
  loss) only makes those rows due again: they are published again and central
  deduplicates them, as after any restart, which resends everything open anyway.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiosqlite

from tillsync_protocol import (
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    AckBody,
    Document,
    TillsyncError,
    TooLargeError,
    UnknownTypeError,
    encode,
    validate,
)

from .store import Store, rollback, transaction

__all__ = ["MARKS_FLUSH_S", "Counts", "Outbox", "OutboxRow", "Submitted", "now_ms"]

T = TypeVar("T")

MARKS_FLUSH_S = 1.0
"""Publish records not carried by another transaction within this time get one of their own."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Submitted:
    seq: int
    doc_id: str
    doc_type: str


@dataclass(frozen=True)
class Counts:
    last_seq: int
    pending: int
    acknowledged: int
    rejected: int


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    doc_id: str
    doc_type: str
    payload: bytes
    attempts: int


@dataclass
class _Request:
    doc_type: str
    body: Mapping[str, Any]
    future: asyncio.Future[Submitted]


_DUE = """
SELECT seq, doc_id, doc_type, payload, attempts FROM outbox
WHERE state IN ('pending', 'published') AND next_attempt_at <= ?
ORDER BY seq LIMIT ?
"""
_NEXT_DUE = "SELECT MIN(next_attempt_at) FROM outbox WHERE state IN ('pending', 'published')"
_NEXT_DUE_AFTER = """
SELECT MIN(next_attempt_at) FROM outbox
WHERE state IN ('pending', 'published') AND next_attempt_at > ?
"""
_INSERT = """
INSERT INTO outbox (seq, doc_id, doc_type, created_at, shift_no, payload, state, next_attempt_at)
VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)
"""
_COUNTERS = "SELECT name, value FROM counters"
_ADD_COUNTER = "UPDATE counters SET value = value + ? WHERE name = ?"
_SET_COUNTER = "UPDATE counters SET value = ? WHERE name = ?"
_MARK_PUBLISHED = """
UPDATE outbox SET state = 'published', attempts = attempts + 1, last_sent_at = ?,
    next_attempt_at = ?
WHERE seq = ? AND state IN ('pending', 'published')
"""
_MARK_FAILED = """
UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?
WHERE seq = ? AND state IN ('pending', 'published')
"""
_ACK_RANGE = """
UPDATE outbox SET state = 'acknowledged', acked_at = ?
WHERE seq BETWEEN ? AND ? AND state IN ('pending', 'published')
"""
_REJECT = """
UPDATE outbox SET state = 'rejected', acked_at = ?, reject_code = ?, reject_field = ?,
    reject_reason = ?
WHERE seq = ? AND state IN ('pending', 'published')
"""
_ALL_DUE = "UPDATE outbox SET next_attempt_at = ? WHERE state IN ('pending', 'published')"
_RANGE_DUE = """
UPDATE outbox SET next_attempt_at = ?
WHERE state IN ('pending', 'published') AND seq BETWEEN ? AND ?
"""
# Rows sent recently are still within their ack timeout: only the rest is resent.
_SHIFT_DUE = """
UPDATE outbox SET next_attempt_at = ?
WHERE state IN ('pending', 'published') AND shift_no = ?
    AND (state = 'pending' OR last_sent_at < ?)
"""
_SET_STATE = "INSERT OR REPLACE INTO agent_state (key, value) VALUES (?, ?)"
# Both over the open rows' partial index, or a primary-key range: cheap at any size.
_OPEN_THROUGH = """
SELECT MIN(seq), COUNT(*) FROM outbox WHERE state IN ('pending', 'published') AND seq <= ?
"""
_OPEN_BETWEEN = """
SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'published') AND seq BETWEEN ? AND ?
"""
_REJECTED_BETWEEN = """
SELECT seq, doc_id, doc_type, reject_code, reject_field, reject_reason FROM outbox
WHERE seq BETWEEN ? AND ? AND state = 'rejected' AND acked_at >= ? ORDER BY seq LIMIT ?
"""


class Outbox:
    """The register's outbox over the one writer connection of :class:`Store`."""

    def __init__(
        self, store: Store, *, register_id: str, center_id: str, resend_after_ms: int = 30_000
    ) -> None:
        self._store = store
        self._resend_after_ms = resend_after_ms
        self.register_id = register_id
        self.center_id = center_id
        # The store's lock: outbox and catalog replica share the one writer connection.
        self._lock = store.write_lock
        self._queue: list[_Request] = []
        self._drainer: asyncio.Task[None] | None = None
        self._acks: list[tuple[AckBody, asyncio.Future[tuple[int, int]]]] = []
        self._counts = Counts(0, 0, 0, 0)
        self.changed = asyncio.Event()
        """Set whenever there may be something new to publish."""
        # The sender's view, valid while _fresh is not None: every open row is either in
        # _fresh (committed since the sender last read the table, in seq order, due now),
        # or handed to the sender and not yet recorded (_handed_out), or due at _wake_at
        # or later (None: never). Whatever else can make a row due sets _fresh to None.
        self._fresh: list[OutboxRow] | None = None
        self._fresh_limit = 0
        self._wake_at: int | None = None
        self._handed_out = False
        # Publish records not yet written: _MARK_PUBLISHED parameters, agent_state values.
        self._marks: list[tuple[int, int, int]] = []
        self._marks_state: dict[str, str | None] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def load(self) -> None:
        """Read the counters (after the store is opened)."""
        async with self._store.db.execute(_COUNTERS) as cursor:
            values = {name: value for name, value in await cursor.fetchall()}
        self._counts = Counts(
            values["last_seq"], values["pending"], values["acknowledged"], values["rejected"]
        )

    @property
    def counts(self) -> Counts:
        """Exact counts as of the last commit; O(1)."""
        return self._counts

    # -- submit -------------------------------------------------------------------------

    async def submit(self, doc_type: str, body: Mapping[str, Any]) -> Submitted:
        """Store a document; return once it is committed with its seq and doc_id.

        Raises a ``ProtocolError`` (code, field, reason) if the document is not valid.
        Never touches the network.
        """
        future: asyncio.Future[Submitted] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(doc_type, body, future))
        self._start_drainer()
        return await asyncio.shield(future)

    def _start_drainer(self) -> None:
        if self._drainer is None or self._drainer.done():
            # One drainer writes whatever is queued, batch after batch, under the write lock.
            # It is not the caller's task: a caller cancelled while waiting (a POS request
            # timing out) cannot interrupt a commit and leave the counters behind.
            self._drainer = asyncio.get_running_loop().create_task(self._drain_all())

    async def _drain_all(self) -> None:
        try:
            while self._queue or self._acks:
                # The lock is taken per batch, not for the whole run: the sender's table
                # reads and the catalog replica's writes, waiting in the lock's FIFO, get
                # their turn between two batches instead of starving while submits keep
                # coming.
                async with self._lock:
                    batch, self._queue = self._queue, []
                    acks, self._acks = self._acks, []
                    await self._write(batch, acks)
        except BaseException as exc:
            # A failed transaction fails its own batch (in _write); what queued meanwhile
            # fails too rather than waiting for a drainer that is gone.
            batch, self._queue = self._queue, []
            acks, self._acks = self._acks, []
            for future in [request.future for request in batch] + [f for _, f in acks]:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancellation and the like end the drainer; errors reached the callers

    async def _exclusive(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` under the write lock and to completion even if the caller is
        cancelled (a POS request timing out): cancelling between COMMIT and the counter
        update would leave the in-memory counts and ``last_seq`` behind the database."""

        async def locked() -> T:
            async with self._lock:
                return await work()

        return await asyncio.shield(locked())

    async def submit_many(
        self, documents: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> list[Submitted]:
        """Submit several documents; they are committed in as few transactions as possible."""
        results = await asyncio.gather(
            *(self.submit(doc_type, body) for doc_type, body in documents), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, Submitted)]

    async def submit_with(
        self,
        doc_type: str,
        body: Callable[[aiosqlite.Connection], Awaitable[Mapping[str, Any]]],
        write: Callable[[aiosqlite.Connection, Submitted], Awaitable[None]],
    ) -> Submitted:
        """Store one document in the same transaction as the caller's own writes.

        Inside one ``BEGIN IMMEDIATE`` transaction: ``body(db)`` reads what it needs and
        returns the document's body, the document is validated and inserted with the next
        seq, then ``write(db, submitted)`` adds the caller's writes (the catalog replica's
        item edit). Any error rolls all of it back (no seq is used) and is raised.
        """
        submitted = await self._exclusive(lambda: self._write_with(doc_type, body, write))
        self.changed.set()
        return submitted

    async def _write_with(
        self,
        doc_type: str,
        body: Callable[[aiosqlite.Connection], Awaitable[Mapping[str, Any]]],
        write: Callable[[aiosqlite.Connection, Submitted], Awaitable[None]],
    ) -> Submitted:
        db = self._store.db
        counts = self._counts
        now = now_ms()
        try:
            await db.execute("BEGIN IMMEDIATE")
            document = self._build(doc_type, await body(db), counts.last_seq + 1, now)
            payload = encode(document)
            if len(payload) > MAX_MESSAGE_SIZE:
                raise TooLargeError(
                    f"the encoded document is {len(payload)} bytes, the limit is "
                    f"{MAX_MESSAGE_SIZE}",
                )
            shift_no = getattr(getattr(document, "body", None), "shift_no", None)
            await db.execute(
                _INSERT, (document.seq, document.doc_id, document.type, now, shift_no, payload, now)
            )
            submitted = Submitted(document.seq, document.doc_id, document.type)
            await write(db, submitted)
            await db.execute(_SET_COUNTER, (document.seq, "last_seq"))
            await db.execute(_ADD_COUNTER, (1, "pending"))
            await db.execute("COMMIT")
        except BaseException:
            await rollback(db)
            raise
        self._counts = Counts(
            document.seq, counts.pending + 1, counts.acknowledged, counts.rejected
        )
        self._add_fresh(
            [OutboxRow(document.seq, document.doc_id, document.type, payload, 0)],
            shift_closed=document.type == "shift_close",
        )
        return submitted

    async def _write(
        self,
        batch: Sequence[_Request],
        acks: Sequence[tuple[AckBody, asyncio.Future[tuple[int, int]]]] = (),
    ) -> None:
        """One transaction: the publish records, the valid documents of ``batch`` and the
        ``acks`` (after the records: an ack usually follows its confirm within
        milliseconds, and must find the row published)."""
        counts = self._counts
        seq = counts.last_seq
        rows: list[tuple[Any, ...]] = []
        accepted: list[tuple[_Request, Submitted]] = []
        shifts_closed: list[int] = []
        now = now_ms()
        for request in batch:
            try:
                document = self._build(request.doc_type, request.body, seq + 1, now)
                payload = encode(document)
                if len(payload) > MAX_MESSAGE_SIZE:
                    # Central would refuse it as too_large: refuse it now, before it has a seq.
                    raise TooLargeError(
                        f"the encoded document is {len(payload)} bytes, the limit is "
                        f"{MAX_MESSAGE_SIZE}",
                    )
            except TillsyncError as exc:
                request.future.set_exception(exc)
                continue
            seq += 1
            shift_no = getattr(getattr(document, "body", None), "shift_no", None)
            if document.type == "shift_close" and shift_no is not None:
                shifts_closed.append(shift_no)
            rows.append((seq, document.doc_id, document.type, now, shift_no, payload, now))
            accepted.append((request, Submitted(seq, document.doc_id, document.type)))
        if not rows and not acks:
            return
        last_seq = seq
        marks = self._take_marks()
        ack_bodies = [ack for ack, _ in acks]

        def work(db: sqlite3.Connection) -> list[tuple[int, int]]:
            if marks is not None:
                marks(db)
            if rows:
                db.executemany(_INSERT, rows)
                # A shift close triggers a check of the whole shift: resend what is open.
                for shift_no in shifts_closed:
                    db.execute(_SHIFT_DUE, (now, shift_no, now - self._resend_after_ms))
                db.execute(_SET_COUNTER, (last_seq, "last_seq"))
                db.execute(_ADD_COUNTER, (len(rows), "pending"))
            return _apply_acks(db, ack_bodies, now)

        try:
            # One hop to the SQLite thread for the whole transaction (see Store.in_thread).
            results = await self._store.in_thread(lambda db: transaction(db, work))
        except BaseException as exc:
            for future in [request.future for request, _ in accepted] + [f for _, f in acks]:
                if not future.done():
                    future.set_exception(exc)
            raise
        acked = sum(a for a, _ in results)
        rejected = sum(r for _, r in results)
        self._counts = Counts(
            last_seq,
            counts.pending + len(rows) - acked - rejected,
            counts.acknowledged + acked,
            counts.rejected + rejected,
        )
        for (_, future), result in zip(acks, results, strict=True):
            future.set_result(result)
        if rows:
            self._add_fresh(
                [OutboxRow(r[0], r[1], r[2], r[5], 0) for r in rows],
                shift_closed=bool(shifts_closed),
            )
            for request, submitted in accepted:
                request.future.set_result(submitted)
            self.changed.set()

    def _add_fresh(self, rows: list[OutboxRow], *, shift_closed: bool) -> None:
        """Rows just committed (under the write lock): the sender's view gains them, or is
        dropped if they overflow it or a shift close made older rows due."""
        if self._fresh is None:
            return
        if shift_closed or len(self._fresh) + len(rows) > self._fresh_limit:
            self._fresh = None
        else:
            self._fresh.extend(rows)

    def _build(self, doc_type: str, body: Mapping[str, Any], seq: int, now: int) -> Document:
        message = validate(
            {
                "v": list(PROTOCOL_VERSION),
                "type": doc_type,
                "created_at": now,
                "doc_id": str(uuid.uuid4()),
                "register_id": self.register_id,
                "center_id": self.center_id,
                "seq": seq,
                "body": dict(body),
            }
        )
        if not isinstance(message, Document):
            raise UnknownTypeError(f"{doc_type!r} is not a document type", field="type")
        return message

    # -- sending ------------------------------------------------------------------------

    async def due(self, limit: int, now: int | None = None) -> list[OutboxRow]:
        """Rows to publish now, in seq order (read from the table, publish records first).

        Read under the write lock: :meth:`submit_with` inserts its row in a transaction of
        several steps on the same connection, and a read between two of them would see
        (and publish) a row that a rollback then takes back, its seq reused by another
        document."""
        at = now_ms() if now is None else now
        async with self._lock:
            rows, _ = await self._read_due(limit, at)
        return rows

    async def take_due(self, limit: int) -> list[OutboxRow]:
        """The sender's next round: what :meth:`due` would return, without a trip to the
        SQLite thread when the rows committed since the last read are all there is.

        The rows handed out must be recorded (:meth:`mark_published`, :meth:`mark_failed`)
        before the next call, or that call reads the table again."""
        now = now_ms()
        fresh = self._fresh
        if (
            fresh is not None
            and not self._handed_out
            and self._fresh_limit == limit
            and (self._wake_at is None or now < self._wake_at)
        ):
            self._fresh = []
            self._handed_out = bool(fresh)
            return fresh
        async with self._lock:
            self._fresh = None
            rows, wake_at = await self._read_due(limit, now)
            if len(rows) < limit:
                # Everything due is in hand; what commits from now on is added to _fresh.
                self._fresh, self._fresh_limit, self._wake_at = [], limit, wake_at
        self._handed_out = bool(rows)
        return rows

    async def _read_due(self, limit: int, at: int) -> tuple[list[OutboxRow], int | None]:
        """Under the write lock: the due rows and the earliest later resend time, in one
        trip (the pending publish records committed first, not durably)."""
        marks = self._take_marks()

        def read(db: sqlite3.Connection) -> tuple[list[Any], int | None]:
            if marks is not None:
                transaction(db, marks, durable=False)
            rows = db.execute(_DUE, (at, limit)).fetchall()
            (wake_at,) = db.execute(_NEXT_DUE_AFTER, (at,)).fetchone()
            return rows, wake_at

        rows, wake_at = await self._store.in_thread(read)
        return [OutboxRow(*row) for row in rows], wake_at

    async def next_due_at(self) -> int | None:
        """When the earliest open row is due (ms), None if there is none."""
        if self._fresh is not None and not self._handed_out:
            return now_ms() if self._fresh else self._wake_at
        async with self._lock:
            marks = self._take_marks()

            def read(db: sqlite3.Connection) -> Any:
                if marks is not None:
                    transaction(db, marks, durable=False)
                return db.execute(_NEXT_DUE).fetchone()

            row = await self._store.in_thread(read)
        return None if row is None else row[0]

    async def mark_published(
        self,
        published: Sequence[tuple[int, int]],
        now: int,
        state: Mapping[str, str | None] | None = None,
    ) -> None:
        """``published`` is ``(seq, next_attempt_at)`` for each confirmed publish; ``state``
        (agent_state keys) is written with them.

        Not written at once: the records go with the next transaction on the connection
        (see the module's docstring), at the latest ``MARKS_FLUSH_S`` later."""
        self._marks.extend((now, next_at, seq) for seq, next_at in published)
        if state:
            self._marks_state.update(state)
        self._recorded(next_at for _, next_at in published)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def mark_failed(self, failed: Sequence[tuple[int, int]]) -> None:
        """``failed`` is ``(seq, next_attempt_at)``: not confirmed, try again then."""
        await self._transaction([(_MARK_FAILED, [(next_at, seq) for seq, next_at in failed])])
        self._recorded(next_at for _, next_at in failed)

    def _recorded(self, next_attempts: Iterable[int]) -> None:
        """The sender recorded its round: the rows are due again at these times."""
        self._handed_out = False
        earliest = min(next_attempts, default=None)
        if earliest is not None and (self._wake_at is None or earliest < self._wake_at):
            self._wake_at = earliest

    def _take_marks(self) -> Callable[[sqlite3.Connection], None] | None:
        """The pending publish records as work for the transaction about to run (called
        under the write lock, on the loop). A transaction that fails loses them: the rows
        stay due in the table and are published again at the latest when the sender reads
        it next (duplicates central drops, never a loss)."""
        if not self._marks and not self._marks_state:
            return None
        marks, self._marks = self._marks, []
        state, self._marks_state = list(self._marks_state.items()), {}

        def apply(db: sqlite3.Connection) -> None:
            if marks:
                db.executemany(_MARK_PUBLISHED, marks)
            if state:
                db.executemany(_SET_STATE, state)

        return apply

    async def _flush_later(self) -> None:
        await asyncio.sleep(MARKS_FLUSH_S)
        await self.flush()

    async def flush(self) -> None:
        """Write the pending publish records now (not durably; see the module's docstring)."""
        await self._exclusive(self._flush_marks)

    async def _flush_marks(self) -> None:
        if not self._store.is_open:
            return
        marks = self._take_marks()
        if marks is not None:
            await self._store.in_thread(lambda db: transaction(db, marks, durable=False))

    async def close(self) -> None:
        """Write the pending publish records and stop the timer (before the store closes)."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()

    async def make_due(self, *, first: int | None = None, last: int | None = None) -> None:
        """Make open rows (all, or a seq range) due now: reconnect, sweep, resend request."""
        now = now_ms()
        self._fresh = None
        if first is None or last is None:
            await self._transaction([(_ALL_DUE, [(now,)])])
        else:
            await self._transaction([(_RANGE_DUE, [(now, first, last)])])
        self._fresh = None  # also if the sender read the table meanwhile: read it again
        self.changed.set()

    async def apply_ack(self, ack: AckBody) -> tuple[int, int]:
        """Mark acknowledged and rejected rows; returns how many changed state (a repeated
        ack changes nothing).

        Acks queue for the submits' drainer: those that arrive together, and the submits
        they meet, are applied in one transaction (central acks every small batch; one
        fsync and one thread hop per ack would cost the till more than the documents).
        """
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._acks.append((ack, future))
        self._start_drainer()
        return await asyncio.shield(future)

    async def rejected_documents(self, limit: int = 100) -> list[dict[str, Any]]:
        sql = """SELECT seq, doc_id, doc_type, reject_code, reject_field, reject_reason
                 FROM outbox WHERE state = 'rejected' ORDER BY seq DESC LIMIT ?"""
        async with self._store.db.execute(sql, (limit,)) as cursor:
            names = ["seq", "doc_id", "doc_type", "code", "field", "reason"]
            return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]

    async def open_through(self, last_seq: int) -> tuple[int | None, int]:
        """``(first seq, count)`` of the rows up to ``last_seq`` not yet acknowledged nor
        rejected (first is None when there are none)."""
        async with self._store.db.execute(_OPEN_THROUGH, (last_seq,)) as cursor:
            row = await cursor.fetchone()
        return (None, 0) if row is None or row[0] is None else (int(row[0]), int(row[1]))

    async def open_between(self, first: int, last: int) -> int:
        """Rows with ``first <= seq <= last`` not yet acknowledged nor rejected."""
        async with self._store.db.execute(_OPEN_BETWEEN, (first, last)) as cursor:
            row = await cursor.fetchone()
        return 0 if row is None else int(row[0])

    async def rejected_between(
        self, first: int, last: int, since: int, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Rows with ``first <= seq <= last`` that central rejected at ``since`` (ms) or
        later, in seq order."""
        names = ["seq", "doc_id", "doc_type", "code", "field", "reason"]
        async with self._store.db.execute(_REJECTED_BETWEEN, (first, last, since, limit)) as cursor:
            return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]

    async def set_state(self, key: str, value: str | None) -> None:
        await self._transaction([(_SET_STATE, [(key, value)])])

    async def _transaction(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        await self._exclusive(lambda: self._run(statements))

    async def _run(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        # The publish records first: a make_due after them must win over their resend times.
        marks = self._take_marks()

        def work(db: sqlite3.Connection) -> None:
            if marks is not None:
                marks(db)
            for sql, params in statements:
                db.executemany(sql, params)

        await self._store.in_thread(lambda db: transaction(db, work))


def _apply_acks(db: sqlite3.Connection, acks: Sequence[AckBody], now: int) -> list[tuple[int, int]]:
    """On the SQLite thread, in the caller's transaction: each ack's rows marked, and the
    counters moved; returns ``(acknowledged, rejected)`` rows changed, per ack."""
    results: list[tuple[int, int]] = []
    for ack in acks:
        acked_one = rejected_one = 0
        for seq_range in ack.accepted:
            acked_one += db.execute(_ACK_RANGE, (now, seq_range.first, seq_range.last)).rowcount
        for rejection in ack.rejected:
            cursor = db.execute(
                _REJECT, (now, rejection.code, rejection.field, rejection.reason, rejection.seq)
            )
            rejected_one += cursor.rowcount
        results.append((acked_one, rejected_one))
    if results:
        acked = sum(a for a, _ in results)
        rejected = sum(r for _, r in results)
        db.execute(_ADD_COUNTER, (-(acked + rejected), "pending"))
        db.execute(_ADD_COUNTER, (acked, "acknowledged"))
        db.execute(_ADD_COUNTER, (rejected, "rejected"))
    return results
