"""Applying one ingest batch to PostgreSQL, in one transaction (or, for a batch of sales
alone, in one statement that checks the registers too: :func:`_statement_alone`; when a
register refuses a delivery, that statement stores nothing and the batch takes the
transaction).

Within the transaction: look up the registers the batch mentions and finish the checks
(:mod:`tillsync_central.intake`); insert the valid documents with ``ON CONFLICT DO
NOTHING`` (array parameters and ``unnest``, whatever the batch size), in the same
statement as the receipts rows and the stock lines of those it stored; classify what was
not inserted by comparing content hashes (same bytes: a duplicate, acknowledged again;
different bytes: a conflict, recorded and rejected, the stored document untouched); fill
the shifts for what was new; keep refused deliveries as dead letters; apply the new
``item_edit`` documents to the catalog (:mod:`tillsync_central.item_edits`), rejecting
those that lost (``edit_conflict``) now and on every redelivery; post the new loyalty
accruals and redemptions to the customers' balances (:mod:`tillsync_central.loyalty`);
record the stock movements of the new voids (:mod:`tillsync_central.stock`). After the
transaction, ``register_state`` is moved on by :data:`ADVANCE_STATE`: by
:func:`store` itself (:func:`advance_state`), or, for the ingest workers, by
:class:`tillsync_central.ingest.StateAdvancer` once the batch's acks are published.

The result says, per register, which seqs to acknowledge and which to reject; nothing is
acknowledged before the transaction commits (the worker publishes after :func:`store`).

``ON CONFLICT`` names no constraint on purpose: a document whose ``doc_id`` already
belongs to another key must not abort the batch either; it is found afterwards and
recorded as a ``doc_id`` conflict.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import structlog

from tillsync_protocol import (
    CashMovement,
    ConflictError,
    Document,
    ItemEdit,
    Receipt,
    Refund,
    Rejection,
    TillsyncError,
)

from . import typed_rows
from .catalog import lock_scope, scope_order
from .dead_letters import Conn, DeadLetter, insert_dead_letters
from .intake import Inspection, RegisterRow, attribute, check_register, register_of_user
from .item_edits import apply_item_edits, edit_scopes, previous_refusals
from .loyalty import loyalty_scopes, post_loyalty
from .stock import record_voids, sale_line_columns

__all__ = ["ADVANCE_STATE", "BatchResult", "advance_state", "is_transient", "store"]

log = structlog.get_logger(__name__)

_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")

_REGISTERS = """
SELECT register_id, center_id, revoked_at FROM registers WHERE register_id = ANY($1::text[])
"""
# One statement, so one round trip, stores a round's documents and, for those it stored
# (not the duplicates or conflicts), their receipts rows (typed_rows.receipt_columns) and
# their stock lines summed per center and item (stock.sale_line_columns). The receipts'
# foreign key to documents is checked at the end of the statement, when the documents'
# rows are there.
# With $27 (register ids), the statement first checks that every document's register is
# known, not revoked and of the document's center (intake.check_register's rule, which
# decides from the register rows returned, seq NULL) and stores nothing if one is not:
# a batch that is a statement alone needs no round trip of its own for its registers.
_INSERT_DOCUMENTS = """
WITH regs AS (
    SELECT register_id, center_id, revoked_at FROM registers
    WHERE register_id = ANY($27::text[])
), allowed AS (
    SELECT $27::text[] IS NULL OR NOT EXISTS (
        SELECT 1 FROM unnest($1::text[], $4::text[]) AS c(register_id, center_id)
        LEFT JOIN regs r USING (register_id)
        WHERE r.register_id IS NULL OR r.revoked_at IS NOT NULL OR r.center_id <> c.center_id
    ) AS ok
), new AS (
    INSERT INTO documents (register_id, seq, doc_id, center_id, doc_type, created_at, payload,
                           payload_json, content_hash)
    SELECT u.register_id, u.seq, u.doc_id, u.center_id, u.doc_type, u.created_at, u.payload,
           u.payload_json::jsonb, u.content_hash
    FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[],
                $6::timestamptz[], $7::bytea[], $8::text[], $9::bytea[])
         AS u(register_id, seq, doc_id, center_id, doc_type, created_at, payload, payload_json,
              content_hash)
    WHERE (SELECT ok FROM allowed)
    ON CONFLICT DO NOTHING
    RETURNING register_id, seq
), new_receipts AS (
    INSERT INTO receipts (register_id, seq, doc_id, center_id, kind, receipt_no, shift_no,
                          currency, total, line_count, customer_id, created_at)
    SELECT r.*
    FROM unnest($10::text[], $11::bigint[], $12::uuid[], $13::text[], $14::text[],
                $15::text[], $16::bigint[], $17::text[], $18::bigint[], $19::integer[],
                $20::text[], $21::timestamptz[])
         AS r(register_id, seq, doc_id, center_id, kind, receipt_no, shift_no, currency, total,
              line_count, customer_id, created_at)
    JOIN new USING (register_id, seq)
), moved AS (
    INSERT INTO stock_pending (center_id, item_id, qty_milli)
    SELECT l.center_id, l.item_id, sum(l.qty_milli)
    FROM unnest($22::text[], $23::bigint[], $24::text[], $25::text[], $26::bigint[])
         AS l(register_id, seq, center_id, item_id, qty_milli)
    JOIN new USING (register_id, seq)
    GROUP BY l.center_id, l.item_id
    HAVING sum(l.qty_milli) <> 0
)
SELECT register_id, seq, NULL::text AS center_id, NULL::timestamptz AS revoked_at FROM new
UNION ALL
SELECT register_id, NULL, center_id, revoked_at FROM regs
"""
_EXISTING_BY_KEY = """
SELECT d.register_id, d.seq, d.content_hash
FROM documents d JOIN unnest($1::text[], $2::bigint[]) AS k(register_id, seq)
     USING (register_id, seq)
"""
_EXISTING_BY_DOC_ID = """
SELECT doc_id::text AS doc_id, content_hash FROM documents WHERE doc_id = ANY($1::uuid[])
"""
_INSERT_CONFLICTS = """
INSERT INTO conflicts (kind, register_id, seq, doc_id, existing_hash, incoming_hash,
                       incoming_payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::uuid[], $5::bytea[],
                     $6::bytea[], $7::bytea[])
ON CONFLICT (register_id, seq, incoming_hash) DO NOTHING
"""
# contiguous_seq moves to the end of the run of stored seqs that starts right after it
# (if seq contiguous_seq + 1 is stored at all); last_seq is at least that far. One
# statement, so one round trip; two workers moving one register concurrently may leave
# contiguous_seq short, and the register's next batch (or the reconciler) moves it on.
# The run is walked one primary-key probe per seq, so a write reads what was stored since
# the last one, not the register's whole history: a NOT EXISTS over documents here was
# planned as a hash anti-join of every document of the register, per write (17 ms a
# register at 100,000 documents, growing with them; docs/performance.md).
_RUN_END = """
(WITH RECURSIVE run (seq) AS (
     SELECT s.contiguous_seq
     UNION ALL
     SELECT run.seq + 1 FROM run
     WHERE EXISTS (SELECT 1 FROM documents d
                   WHERE d.register_id = s.register_id AND d.seq = run.seq + 1))
 SELECT max(seq) FROM run)
"""
ADVANCE_STATE = f"""
INSERT INTO register_state AS s (register_id, last_seq, last_received_at)
SELECT u.register_id, u.max_seq, now()
FROM unnest($1::text[], $2::bigint[]) AS u(register_id, max_seq)
ON CONFLICT (register_id) DO UPDATE
SET last_received_at = now(),
    contiguous_seq = {_RUN_END},
    last_seq = GREATEST(s.last_seq, EXCLUDED.last_seq, {_RUN_END})
"""
_NOT_DURABLE = "BEGIN; SET LOCAL synchronous_commit TO OFF"
_ALONE_TYPES = (Receipt, Refund, CashMovement)
"""The document types whose whole effect is the documents statement (with their receipts
rows and stock lines): a batch of only these needs no transaction around it."""


@dataclass
class BatchResult:
    """What a batch did, and what to tell each register."""

    accepted: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    rejected: dict[str, list[Rejection]] = field(default_factory=lambda: defaultdict(list))
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    refused: int = 0
    item_edits_applied: int = 0
    item_edits_refused: int = 0
    loyalty_posted: int = 0
    stock_lines: int = 0
    stored_through: dict[str, int] = field(default_factory=dict)
    """Per register, the highest seq of this batch that is stored (new or a duplicate)."""

    def merge(self, other: BatchResult) -> None:
        for register_id, seqs in other.accepted.items():
            self.accepted[register_id] |= seqs
        for register_id, rejections in other.rejected.items():
            self.rejected[register_id].extend(rejections)
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.conflicts += other.conflicts
        self.refused += other.refused
        self.item_edits_applied += other.item_edits_applied
        self.item_edits_refused += other.item_edits_refused
        self.loyalty_posted += other.loyalty_posted
        self.stock_lines += other.stock_lines
        for register_id, seq in other.stored_through.items():
            self.stored_through[register_id] = max(seq, self.stored_through.get(register_id, 0))


@dataclass(frozen=True)
class _Refused:
    """A checked documents statement stored nothing: a register refuses a delivery."""

    registers: dict[str, RegisterRow]


@dataclass(frozen=True)
class _Valid:
    inspection: Inspection
    document: Document
    content_hash: bytes

    @property
    def key(self) -> tuple[str, int]:
        return self.document.register_id, self.document.seq


def is_transient(exc: BaseException) -> bool:
    """True for failures that retrying the same batch later can cure (connection lost,
    server shutting down, deadlock, serialization), False for what it cannot (bad data)."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    if isinstance(exc, ValueError):  # asyncpg's client-side encoding errors: bad data
        return False
    return isinstance(exc, (OSError, asyncpg.InterfaceError, TimeoutError))


async def store(
    pool: asyncpg.Pool, inspections: Sequence[Inspection], *, advance: bool = True
) -> BatchResult:
    """Apply a batch in one transaction; then, unless ``advance`` is False, move
    ``register_state`` on (:func:`advance_state`; ingest moves it itself after publishing
    its acks, off the documents' way back).

    Raises what :func:`is_transient` calls transient (the caller retries the whole batch;
    the transaction was rolled back, or committed, which a retry finds as duplicates). If
    the batch fails for another reason, each delivery is applied alone, and one that still
    fails becomes a dead letter: with central's own code when central refused it (such as
    ``loyalty_limit``), else ``store_failed``. Bad input never blocks the rest.
    """
    result = await _store(pool, inspections)
    if advance:
        await advance_state(pool, result.stored_through)
    return result


async def _store(pool: asyncpg.Pool, inspections: Sequence[Inspection]) -> BatchResult:
    try:
        return await _apply(pool, inspections)
    except Exception as exc:
        if is_transient(exc):
            raise
        if len(inspections) == 1:
            return await _store_failed(pool, inspections[0], exc)
        log.warning("batch failed, applying its deliveries one by one", error=repr(exc))
    result = BatchResult()
    for inspection in inspections:
        result.merge(await _store(pool, [inspection]))
    return result


async def advance_state(pool: asyncpg.Pool, stored_through: dict[str, int]) -> None:
    """Move ``register_state`` on after a batch: in a short transaction of its own,
    never durable at COMMIT, and never failing the caller.

    Not in the batch's transaction: every batch names every busy register, so the
    workers would queue on these rows from there to their COMMIT, fsync included, and
    batches would commit one at a time. Not durable (``synchronous_commit`` off) and
    allowed to fail: the row is a summary of ``documents`` that only ever moves forward,
    and one left behind (by a crash, or a failure here, which is logged) is moved on by
    the register's next batch and by the reconciler; the documents themselves were
    committed durably before this.
    """
    if not stored_through:
        return
    registers = sorted(stored_through)
    try:
        async with pool.acquire() as conn:
            await conn.execute(_NOT_DURABLE)  # one round trip for both, no parameters
            try:
                await conn.execute(ADVANCE_STATE, registers, [stored_through[r] for r in registers])
                await conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
    except Exception as exc:
        log.warning("register_state not advanced", registers=registers, error=repr(exc))


async def _apply(pool: asyncpg.Pool, inspections: Sequence[Inspection]) -> BatchResult:
    result = BatchResult()
    async with pool.acquire() as conn:
        if _statement_alone(inspections):
            # The registers are checked and read by the documents statement itself.
            refused = await _store_documents(
                conn, [_valid(i) for i in inspections], result, check=_register_ids(inspections)
            )
            if refused is None:
                return result
            registers = refused.registers  # nothing was stored: a delivery is refused below
        else:
            # Read once, before the transaction: under READ COMMITTED a read inside one
            # would see nothing newer.
            registers = await _registers(conn, inspections)
        async with conn.transaction():
            valid: list[_Valid] = []
            letters: list[DeadLetter] = []
            for inspection in inspections:
                error = check_register(inspection, registers)
                if error is None and inspection.document is not None:
                    valid.append(_valid(inspection))
                else:
                    error = error or TillsyncError("refused", code="refused")
                    letters.append(_refuse(result, inspection, error, registers))
            await _store_documents(conn, valid, result)
            await insert_dead_letters(conn, letters)
    return result


def _statement_alone(inspections: Sequence[Inspection]) -> bool:
    """True when the batch's whole effect is one documents statement, which is a
    transaction by itself: every delivery is a document of a kind that writes nothing
    else (:data:`_ALONE_TYPES`), and no key or ``doc_id`` comes twice (one round).
    Such a batch skips ``BEGIN`` and ``COMMIT``, two of its few round trips. What may
    follow the statement only records what it did not store: a conflict is recorded by a
    statement of its own (a crash before it loses nothing: the redelivery finds the
    conflict again and records it then) and a duplicate writes nothing."""
    keys: set[tuple[str, int]] = set()
    doc_ids: set[str] = set()
    for inspection in inspections:
        document = inspection.document
        if inspection.error is not None or not isinstance(document, _ALONE_TYPES):
            return False
        keys.add((document.register_id, document.seq))
        doc_ids.add(document.doc_id)
    return len(keys) == len(doc_ids) == len(inspections)


def _valid(inspection: Inspection) -> _Valid:
    assert inspection.document is not None
    digest = hashlib.sha256(inspection.delivery.body).digest()
    return _Valid(inspection, inspection.document, digest)


def _register_ids(inspections: Sequence[Inspection]) -> list[str]:
    """The registers a batch names: its documents' and its senders' (for attribution)."""
    ids: set[str] = set()
    for inspection in inspections:
        if inspection.document is not None:
            ids.add(inspection.document.register_id)
        user_register = register_of_user(inspection.delivery.user_id)
        if user_register is not None:
            ids.add(user_register)
    return sorted(ids)


async def _registers(conn: Conn, inspections: Sequence[Inspection]) -> dict[str, RegisterRow]:
    ids = _register_ids(inspections)
    if not ids:
        return {}
    rows = await conn.fetch(_REGISTERS, ids)
    return {row["register_id"]: RegisterRow(**dict(row)) for row in rows}


def _refuse(
    result: BatchResult,
    inspection: Inspection,
    error: TillsyncError,
    registers: dict[str, RegisterRow],
) -> DeadLetter:
    delivery = inspection.delivery
    result.refused += 1
    target = attribute(inspection, registers)
    if target is not None and inspection.seq is not None:
        result.rejected[target].append(_rejection(inspection.seq, inspection.doc_id, error))
    log.warning(
        "document refused",
        register_id=inspection.register_id,
        seq=inspection.seq,
        doc_id=inspection.doc_id,
        code=error.code,
        field=error.field,
        reason=error.reason,
        user_id=delivery.user_id,
        routing_key=delivery.routing_key,
        rejected_to=target,
    )
    return DeadLetter(
        source="ingest",
        code=error.code,
        field=error.field,
        reason=error.reason,
        payload=delivery.body,
        routing_key=delivery.routing_key,
        user_id=delivery.user_id,
        message_id=delivery.message_id,
        register_id=inspection.register_id,
        seq=inspection.seq,
        headers=delivery.headers,
    )


def _rejection(seq: int, doc_id: str | None, error: TillsyncError) -> Rejection:
    return Rejection(
        seq=seq, doc_id=doc_id, code=error.code, field=error.field[:200], reason=error.reason[:1000]
    )


async def _store_documents(
    conn: Conn, valid: list[_Valid], result: BatchResult, *, check: list[str] | None = None
) -> _Refused | None:
    """Store ``valid`` (duplicates and conflicts recognised). With ``check`` (the batch's
    register ids; only for a batch of distinct keys and doc_ids, one round), the registers
    are checked in the same statement: if one refuses, nothing is stored and the register
    rows are returned."""
    new: list[_Valid] = []
    duplicates: list[_Valid] = []
    pending = valid
    # One round per repeat depth: a key (or doc_id) that comes twice in a batch is judged
    # in the next round, against what the first round stored. Usually one round.
    while pending:
        keys: set[tuple[str, int]] = set()
        doc_ids: set[str] = set()
        round_items: list[_Valid] = []
        later: list[_Valid] = []
        for item in pending:
            if item.key in keys or item.document.doc_id in doc_ids:
                later.append(item)
            else:
                keys.add(item.key)
                doc_ids.add(item.document.doc_id)
                round_items.append(item)
        stored = await _store_round(conn, round_items, result, duplicates, check)
        if isinstance(stored, _Refused):
            return stored
        new.extend(stored)
        pending, check = later, None
    documents = [item.document for item in new]
    await typed_rows.insert_shifts(conn, documents)
    for item in [*new, *duplicates]:
        register_id, seq = item.key
        result.stored_through[register_id] = max(seq, result.stored_through.get(register_id, 0))
    balances = await _lock_catalog_scopes(conn, documents)
    result.loyalty_posted += len(await post_loyalty(conn, documents, balances))
    await record_voids(conn, documents)
    result.stock_lines += sum(
        len(d.body.lines) for d in documents if isinstance(d, (Receipt, Refund))
    )
    await _settle_item_edits(conn, new, duplicates, result)
    return None


async def _lock_catalog_scopes(conn: Conn, documents: list[Document]) -> dict[tuple[str, int], str]:
    """Lock every catalog scope the batch's loyalty postings and item edits will write,
    in one order (``scope_order``) for both kinds, so two workers cannot deadlock; returns
    the loyalty documents' scopes."""
    balances = await loyalty_scopes(conn, documents)
    scopes = set(balances.values())
    edits = [d for d in documents if isinstance(d, ItemEdit)]
    if edits:
        scopes |= set((await edit_scopes(conn, edits)).values())
    for scope in sorted(scopes, key=scope_order):
        await lock_scope(conn, scope)
    return balances


async def _settle_item_edits(
    conn: Conn, new: list[_Valid], duplicates: list[_Valid], result: BatchResult
) -> None:
    """Apply new item edits; reject those refused now or when first stored."""
    edits = [item.document for item in new if isinstance(item.document, ItemEdit)]
    repeats = [item for item in duplicates if isinstance(item.document, ItemEdit)]
    if not edits and not repeats:
        return
    outcome = await apply_item_edits(conn, edits)
    refused = dict(outcome.refused or {})
    refused.update(await previous_refusals(conn, [item.key for item in repeats]))
    doc_ids = {item.key: item.document.doc_id for item in [*new, *repeats]}
    result.item_edits_applied += outcome.applied
    result.item_edits_refused += len(refused)
    for (register_id, seq), error in sorted(refused.items()):
        result.accepted[register_id].discard(seq)
        result.rejected[register_id].append(_rejection(seq, doc_ids.get((register_id, seq)), error))


async def _store_round(
    conn: Conn,
    items: list[_Valid],
    result: BatchResult,
    duplicates: list[_Valid],
    check: list[str] | None = None,
) -> list[_Valid] | _Refused:
    """Insert items of distinct keys and doc_ids; classify the rest (duplicates appended
    to ``duplicates``); return the new. With ``check``, see :func:`_store_documents`."""
    items = sorted(items, key=lambda item: item.key)  # one lock order for every worker
    inserted, registers = await _insert_documents(conn, items, check)
    if check is not None and any(
        check_register(i.inspection, registers) is not None for i in items
    ):
        return _Refused(registers)  # the statement stored nothing
    new = [item for item in items if item.key in inserted]
    others = [item for item in items if item.key not in inserted]
    conflicts: list[tuple[str, _Valid, bytes]] = []
    if others:
        rows = await conn.fetch(
            _EXISTING_BY_KEY, [i.key[0] for i in others], [i.key[1] for i in others]
        )
        by_key = {(r["register_id"], r["seq"]): bytes(r["content_hash"]) for r in rows}
        orphans = [item for item in others if item.key not in by_key]
        by_doc_id: dict[str, bytes] = {}
        if orphans:
            rows = await conn.fetch(_EXISTING_BY_DOC_ID, [i.document.doc_id for i in orphans])
            by_doc_id = {r["doc_id"]: bytes(r["content_hash"]) for r in rows}
        for item in others:
            existing = by_key.get(item.key)
            if existing is None:
                conflicts.append(("doc_id", item, by_doc_id.get(item.document.doc_id, b"")))
            elif existing == item.content_hash:
                result.duplicates += 1
                duplicates.append(item)
                result.accepted[item.document.register_id].add(item.document.seq)
                log.info("duplicate document acknowledged again", **_ids(item))
            else:
                conflicts.append(("content", item, existing))
    for item in new:
        result.stored += 1
        result.accepted[item.document.register_id].add(item.document.seq)
        log.debug("document stored", **_ids(item))
    await _record_conflicts(conn, conflicts, result)
    return new


def _ids(item: _Valid) -> dict[str, object]:
    return {
        "register_id": item.document.register_id,
        "seq": item.document.seq,
        "doc_id": item.document.doc_id,
    }


async def _insert_documents(
    conn: Conn, items: list[_Valid], check: list[str] | None
) -> tuple[set[tuple[str, int]], dict[str, RegisterRow]]:
    """The keys stored, and the register rows of ``check`` (read by the statement)."""
    docs = [item.document for item in items]
    rows = await conn.fetch(
        _INSERT_DOCUMENTS,
        [d.register_id for d in docs],
        [d.seq for d in docs],
        [d.doc_id for d in docs],
        [d.center_id for d in docs],
        [d.type for d in docs],
        [typed_rows.timestamp(d.created_at) for d in docs],
        [item.inspection.delivery.body for item in items],
        # pydantic's serializer: the same JSON as json.dumps(to_json(d)), in a fraction
        # of the time (tests/protocol/test_properties.py holds it for every type).
        [d.model_dump_json() for d in docs],
        [item.content_hash for item in items],
        *typed_rows.receipt_columns(docs),
        *sale_line_columns(docs),
        check,
    )
    inserted = {(row["register_id"], row["seq"]) for row in rows if row["seq"] is not None}
    registers = {
        row["register_id"]: RegisterRow(row["register_id"], row["center_id"], row["revoked_at"])
        for row in rows
        if row["seq"] is None
    }
    return inserted, registers


async def _record_conflicts(
    conn: Conn, conflicts: list[tuple[str, _Valid, bytes]], result: BatchResult
) -> None:
    if not conflicts:
        return
    for kind, item, _existing in conflicts:
        result.conflicts += 1
        field = "doc_id" if kind == "doc_id" else "seq"
        error = ConflictError(
            f"{'doc_id' if kind == 'doc_id' else 'seq'} {getattr(item.document, field)} is "
            "already stored with different content; the stored document is kept",
            field=field,
        )
        result.rejected[item.document.register_id].append(
            _rejection(item.document.seq, item.document.doc_id, error)
        )
        log.warning("conflict recorded", kind=kind, **_ids(item))
    await conn.execute(
        _INSERT_CONFLICTS,
        [kind for kind, _, _ in conflicts],
        [item.document.register_id for _, item, _ in conflicts],
        [item.document.seq for _, item, _ in conflicts],
        [item.document.doc_id for _, item, _ in conflicts],
        [existing for _, _, existing in conflicts],
        [item.content_hash for _, item, _ in conflicts],
        [item.inspection.delivery.body for _, item, _ in conflicts],
    )


async def _store_failed(
    pool: asyncpg.Pool, inspection: Inspection, exc: BaseException
) -> BatchResult:
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, TillsyncError):  # central's own refusal: its code, field and reason
        error = exc
    elif sqlstate is None:
        error = TillsyncError(
            f"central could not store the document ({type(exc).__name__}): {exc}"[:1000],
            code="store_failed",
        )
    else:
        error = TillsyncError(
            f"PostgreSQL refused the document ({sqlstate}): {exc}"[:1000], code="store_failed"
        )
    result = BatchResult()
    async with pool.acquire() as conn, conn.transaction():
        registers = await _registers(conn, [inspection])
        await insert_dead_letters(conn, [_refuse(result, inspection, error, registers)])
    return result
