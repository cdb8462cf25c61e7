"""The catalog replica: central's catalog as this register keeps it (docs/catalog.md).

Writes go through the store's one writer connection under its write lock, as the outbox's
do; reads (inherited from :class:`CatalogReader`) use a read-only connection, so a POS app
only ever sees committed states, each a consistent snapshot of some central version.

* A real-time change is applied with its scope's cursor in one transaction when its
  ``scope_seq`` is the cursor + 1; an older one is a duplicate; a newer one is a gap, which
  the caller answers with a delta request.
* A delta or reinit is staged page by page in ``catalog_shadow`` and applied (or, for a
  replace, swapped in) with the new cursors in one transaction at ``delta_end``. A kill
  before that commit leaves the old catalog as it was; the next run clears the shadow.
* A row is only ever replaced by central's state of the same or a later ``scope_seq``,
  so partial syncs and late real-time changes never roll a row back.
* Items whose labels share none of this register's are not kept (deleted if present); the
  cursor advances over them all the same.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import aiosqlite

from tillsync_protocol import (
    ENTITIES,
    GLOBAL_SCOPE,
    CatalogChangeBody,
    DeltaPageBody,
    TillsyncError,
)
from tillsync_protocol.control import CatalogValue

from .catalog_events import CatalogEvent, CatalogEvents, CatalogSubscription, EventSource
from .catalog_reader import CatalogReader, entry_of
from .outbox import Outbox, Submitted
from .store import Store

__all__ = [
    "Applied",
    "ApplyMode",
    "ApplyStatus",
    "Replica",
    "ShadowRow",
    "StagedPage",
    "UnknownItemError",
]

T = TypeVar("T")

ApplyStatus = Literal["applied", "duplicate", "gap", "ignored"]
ApplyMode = Literal["delta", "update", "replace"]

_CURSOR = "SELECT seq FROM catalog_cursors WHERE scope = ?"
_SET_CURSOR = """
INSERT INTO catalog_cursors (scope, seq) VALUES (?, ?)
ON CONFLICT (scope) DO UPDATE SET seq = excluded.seq
"""
# Central's state wins over ours when it is at least as new (that clears local_edit).
_UPSERT = """
INSERT INTO catalog (entity, key, scope, version, scope_seq, state, local_edit)
VALUES (?, ?, ?, ?, ?, ?, 0)
ON CONFLICT (entity, key, scope) DO UPDATE SET version = excluded.version,
    scope_seq = excluded.scope_seq, state = excluded.state, local_edit = 0
WHERE excluded.scope_seq >= catalog.scope_seq
"""
_DELETE = "DELETE FROM catalog WHERE entity = ? AND key = ? AND scope = ? AND scope_seq <= ?"
_ITEM_FOR_EDIT = """
SELECT entity, key, scope, version, scope_seq, state, local_edit FROM catalog
WHERE entity = 'items' AND key = ? AND scope IN (?, 'global') ORDER BY scope = 'global' LIMIT 1
"""
_LOCAL_EDIT = """
UPDATE catalog SET state = ?, local_edit = 1 WHERE entity = 'items' AND key = ? AND scope = ?
"""
# Barcodes of some items (a JSON list of keys) are rebuilt from their rows; the center's
# row is inserted last so that its barcodes win.
_UNBARCODE = "DELETE FROM item_barcodes WHERE item_key IN (SELECT value FROM json_each(?))"
_BARCODE_SELECT = """
INSERT OR REPLACE INTO item_barcodes (barcode, item_key)
SELECT b.value, c.key FROM catalog AS c, json_each(c.state, '$.barcodes') AS b
WHERE c.entity = 'items' AND b.type = 'text' {where}
ORDER BY c.scope <> 'global', c.key
"""
_BARCODES_OF = _BARCODE_SELECT.format(where="AND c.key IN (SELECT value FROM json_each(?))")
_BARCODES_ALL = _BARCODE_SELECT.format(where="")

_CLEAR_SHADOW = "DELETE FROM catalog_shadow"
_STAGE = """
INSERT OR IGNORE INTO catalog_shadow
    (request_id, page_no, idx, entity, key, scope, op, version, scope_seq, state, kept)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SHADOW_COUNT = "SELECT COUNT(*) FROM catalog_shadow WHERE request_id = ?"
# Should a key come twice in one answer, only its latest change counts. Central's answers
# have each key once, so the (index-only) check comes first and the delete rarely runs.
_SHADOW_REPEATS = """
SELECT 1 FROM catalog_shadow WHERE request_id = ?
GROUP BY entity, key, scope HAVING COUNT(*) > 1 LIMIT 1
"""
_SHADOW_DEDUPE = """
DELETE FROM catalog_shadow AS s WHERE request_id = ? AND EXISTS (
    SELECT 1 FROM catalog_shadow AS t WHERE t.request_id = s.request_id
        AND t.entity = s.entity AND t.key = s.key AND t.scope = s.scope
        AND (t.scope_seq, t.page_no, t.idx) > (s.scope_seq, s.page_no, s.idx))
"""
# What applying a delta will change (for the notifications), before applying it.
_SHADOW_EFFECTS = """
SELECT s.entity, s.key, s.scope, s.op = 'upsert' AND s.kept = 1, s.version
FROM catalog_shadow AS s LEFT JOIN catalog AS c
    ON c.entity = s.entity AND c.key = s.key AND c.scope = s.scope
WHERE s.request_id = ? AND (c.scope_seq IS NULL OR s.scope_seq >= c.scope_seq)
    AND NOT ((s.op = 'delete' OR s.kept = 0) AND c.key IS NULL)
ORDER BY s.page_no, s.idx
"""
_SHADOW_DELETE = """
DELETE FROM catalog WHERE EXISTS (
    SELECT 1 FROM catalog_shadow AS s WHERE s.request_id = ? AND (s.op = 'delete' OR s.kept = 0)
        AND s.entity = catalog.entity AND s.key = catalog.key AND s.scope = catalog.scope
        AND s.scope_seq >= catalog.scope_seq)
"""
_SHADOW_UPSERT = """
INSERT INTO catalog (entity, key, scope, version, scope_seq, state, local_edit)
SELECT entity, key, scope, version, scope_seq, state, 0 FROM catalog_shadow
WHERE request_id = ? AND op = 'upsert' AND kept = 1 ORDER BY page_no, idx
ON CONFLICT (entity, key, scope) DO UPDATE SET version = excluded.version,
    scope_seq = excluded.scope_seq, state = excluded.state, local_edit = 0
WHERE excluded.scope_seq >= catalog.scope_seq
"""
_SHADOW_ITEM_KEYS = """
SELECT json_group_array(DISTINCT key) FROM catalog_shadow WHERE request_id = ? AND entity = 'items'
"""
_REPLACE_DELETE = "DELETE FROM catalog WHERE entity IN (SELECT value FROM json_each(?))"
# Every row is of one of ENTITIES: replacing them all empties the table (SQLite's truncate).
_REPLACE_DELETE_ALL = "DELETE FROM catalog"
_REPLACE_INSERT = """
INSERT INTO catalog (entity, key, scope, version, scope_seq, state, local_edit)
SELECT entity, key, scope, version, scope_seq, state, 0 FROM catalog_shadow
WHERE request_id = ? AND op = 'upsert' AND kept = 1
    AND entity IN (SELECT value FROM json_each(?))
ORDER BY page_no, idx
"""


class UnknownItemError(TillsyncError):
    """An item edit names an item the replica does not hold."""

    code = "unknown_item"


@dataclass(frozen=True)
class Applied:
    """What applying a staged delta or reinit did."""

    received: int
    """Changes staged (after dropping foreign scopes and repeated keys)."""
    applied: int
    """Rows that changed: upserted or deleted (for a replace: rows swapped in)."""
    cursors: dict[str, int]
    """The cursors after the commit."""


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
"""One encoder for every state (``json.dumps`` builds a new one per call)."""


ShadowRow = tuple[str, int, int, str, str, str, str, int, int, str | None, int]
"""A ``catalog_shadow`` row: request_id, page_no, idx, entity, key, scope, op, version,
scope_seq, state (JSON text, None for a delete), kept."""


@dataclass(frozen=True)
class StagedPage:
    """One ``delta_page`` ready for the shadow."""

    page_no: int
    changes: int
    """Changes in the page, of every scope."""
    foreign: int
    """Changes of scopes this register does not follow (left out of ``rows``)."""
    rows: list[ShadowRow]


def _json(state: Mapping[str, CatalogValue] | None) -> str:
    return _ENCODER.encode(state if isinstance(state, dict) else dict(state or {}))


class Replica(CatalogReader):
    """The catalog replica of one register: reads (see :class:`CatalogReader`) and writes."""

    def __init__(
        self,
        store: Store,
        *,
        path: Path,
        center_id: str,
        labels: Collection[str] = (),
        queue_size: int = 1000,
    ) -> None:
        super().__init__(path, center_id)
        self._store = store
        self.labels = frozenset(labels)
        self.scopes = (GLOBAL_SCOPE, center_id)
        self.events = CatalogEvents(queue_size)

    async def close(self) -> None:
        self.events.close()
        await super().close()

    # -- notifications ------------------------------------------------------------------

    def subscribe(self, maxsize: int | None = None) -> CatalogSubscription:
        return self.events.subscribe(maxsize)

    def on_change(self, callback: Callable[[CatalogEvent], None]) -> Callable[[], None]:
        return self.events.on_change(callback)

    def keeps(self, entity: str, state: Mapping[str, CatalogValue] | None) -> bool:
        """Whether this register keeps a row: a register configured with labels keeps
        only items with no labels or one of its own; one without labels keeps them all."""
        if entity != "items" or state is None or not self.labels:
            return True
        labels = state.get("labels")
        if not isinstance(labels, list) or not labels:
            return True
        return any(isinstance(label, str) and label in self.labels for label in labels)

    # -- real-time changes --------------------------------------------------------------

    async def apply_change(self, change: CatalogChangeBody) -> ApplyStatus:
        """Apply one ``catalog_change``: ``applied`` (with its cursor, in one transaction),
        ``duplicate`` (already applied), ``gap`` (a delta is needed first; nothing was
        written) or ``ignored`` (a scope this register does not follow)."""
        return (await self.apply_changes([change]))[0]

    async def apply_changes(self, changes: Sequence[CatalogChangeBody]) -> list[ApplyStatus]:
        """Apply changes that arrived together, in order, in one transaction: each gets the
        status it would have had alone (see :meth:`apply_change`)."""
        if all(change.scope not in self.scopes for change in changes):
            return ["ignored"] * len(changes)

        def work(db: sqlite3.Connection) -> tuple[list[ApplyStatus], list[CatalogEvent]]:
            positions: dict[str, int] = {}
            statuses: list[ApplyStatus] = []
            events: list[CatalogEvent] = []
            for change in changes:
                status = self._apply_one(db, change, positions, events)
                statuses.append(status)
            for scope, seq in positions.items():
                db.execute(_SET_CURSOR, (scope, seq))
            return statuses, events

        statuses, _ = await self._write_in_thread(work, lambda r: self.events.publish(r[1]))
        return statuses

    def _apply_one(
        self,
        db: sqlite3.Connection,
        change: CatalogChangeBody,
        positions: dict[str, int],
        events: list[CatalogEvent],
    ) -> ApplyStatus:
        """One change inside :meth:`apply_changes`' transaction; ``positions`` holds the
        cursors it has moved so far (written once, at the end)."""
        if change.scope not in self.scopes:
            return "ignored"
        position = positions.get(change.scope)
        if position is None:
            row = db.execute(_CURSOR, (change.scope,)).fetchone()
            position = 0 if row is None else int(row[0])
        if change.scope_seq <= position:
            return "duplicate"
        if change.scope_seq > position + 1:
            return "gap"
        kept = change.op == "upsert" and self.keeps(change.entity, change.state)
        where = (change.entity, change.key, change.scope)
        if kept:
            cursor = db.execute(
                _UPSERT, (*where, change.version, change.scope_seq, _json(change.state))
            )
        else:
            cursor = db.execute(_DELETE, (*where, change.scope_seq))
        positions[change.scope] = change.scope_seq
        if cursor.rowcount > 0:
            if change.entity == "items":
                keys = json.dumps([change.key])
                db.execute(_UNBARCODE, (keys,))
                db.execute(_BARCODES_OF, (keys,))
            op: Literal["upsert", "delete"] = "upsert" if kept else "delete"
            events.append(
                CatalogEvent(change.entity, change.key, change.scope, op, change.version, "change")
            )
        return "applied"

    async def _write_in_thread(
        self,
        work: Callable[[sqlite3.Connection], T],
        after: Callable[[T], None] | None = None,
    ) -> T:
        """As :meth:`Store.write`, but the whole transaction (``BEGIN IMMEDIATE``, ``work``,
        ``COMMIT``) runs as one call on the connection's thread: one hop to that thread and
        back instead of one per statement, which is most of a real-time change's cost.
        Under the store's write lock, and shielded from cancellation as ``write`` is."""
        db = self._store.db

        async def locked() -> T:
            async with self._store.write_lock:
                # aiosqlite runs a callable on its thread only through _execute.
                result: T = await db._execute(_transaction, db._conn, work)  # type: ignore[no-untyped-call]
                if after is not None:
                    after(result)
                return result

        return await asyncio.shield(locked())

    # -- deltas and reinits -------------------------------------------------------------

    async def begin_staging(self) -> None:
        """Clear the shadow (what an interrupted run left) before a new request."""

        async def clear(db: aiosqlite.Connection) -> None:
            await db.execute(_CLEAR_SHADOW)

        await self._store.write(clear)

    async def stage(self, request_id: str, page: DeltaPageBody) -> int:
        """Write one page into the shadow (a redelivered page changes nothing); returns the
        number of changes of scopes this register does not follow (they are left out)."""
        staged = self.shadow_rows(request_id, page)
        await self.stage_rows([staged])
        return staged.foreign

    def shadow_rows(self, request_id: str, page: DeltaPageBody) -> StagedPage:
        """A page as the rows :meth:`stage_rows` writes: plain tuples of strings and
        integers (states as JSON text), so that pages waiting to be staged cost the
        garbage collector next to nothing, unlike the decoded models they come from."""
        scopes = self.scopes
        rows: list[ShadowRow] = [
            (
                request_id,
                page.page_no,
                idx,
                c.entity,
                c.key,
                c.scope,
                c.op,
                c.version,
                c.scope_seq,
                None if c.op == "delete" else _json(c.state),
                int(c.op == "delete" or self.keeps(c.entity, c.state)),
            )
            for idx, c in enumerate(page.changes)
            if c.scope in scopes
        ]
        return StagedPage(page.page_no, len(page.changes), len(page.changes) - len(rows), rows)

    async def stage_rows(self, pages: Sequence[StagedPage]) -> None:
        """Write pages (from :meth:`shadow_rows`) into the shadow in one transaction: one
        commit for pages that arrived together, however far they ran ahead of staging."""

        def insert(db: sqlite3.Connection) -> None:
            for page in pages:
                db.executemany(_STAGE, page.rows)

        await self._write_in_thread(insert)

    async def apply_staged(
        self,
        request_id: str,
        *,
        mode: ApplyMode,
        entities: Collection[str],
        cursors: Mapping[str, int] | None,
    ) -> Applied:
        """Apply the staged answer to ``request_id`` and move the cursors, in one transaction.

        ``delta`` and ``update`` upsert and delete row by row (never rolling a row back);
        ``replace`` deletes every row of ``entities`` and inserts the staged ones. Cursors
        are set from ``cursors`` (None: they stay, as after a partial sync).
        """

        async def work(db: aiosqlite.Connection) -> tuple[Applied, list[CatalogEvent]]:
            async with db.execute(_SHADOW_REPEATS, (request_id,)) as cursor:
                repeats = await cursor.fetchone() is not None
            if repeats:
                await db.execute(_SHADOW_DEDUPE, (request_id,))
            async with db.execute(_SHADOW_COUNT, (request_id,)) as cursor:
                row = await cursor.fetchone()
            received = 0 if row is None else int(row[0])
            if mode == "replace":
                applied, events = await self._swap(db, request_id, sorted(entities))
            else:
                applied, events = await self._merge(db, request_id, mode)
            new_cursors = dict(await self._cursors(db))
            for scope, seq in (cursors or {}).items():
                if scope in self.scopes:
                    await db.execute(_SET_CURSOR, (scope, seq))
                    new_cursors[scope] = seq
            # Only this request's rows are staged (one sync at a time; each starts with an
            # empty shadow): emptying the whole table is SQLite's truncate, not a row scan.
            await db.execute(_CLEAR_SHADOW)
            return Applied(received, applied, new_cursors), events

        result, _ = await self._store.write(work, after=lambda r: self.events.publish(r[1]))
        return result

    async def _merge(
        self, db: aiosqlite.Connection, request_id: str, mode: ApplyMode
    ) -> tuple[int, list[CatalogEvent]]:
        source: EventSource = "delta" if mode == "delta" else "reinit"
        async with db.execute(_SHADOW_EFFECTS, (request_id,)) as cursor:
            events = [
                CatalogEvent(
                    str(entity),
                    str(key),
                    str(scope),
                    "upsert" if upsert else "delete",
                    int(version),
                    source,
                )
                for entity, key, scope, upsert, version in await cursor.fetchall()
            ]
        await db.execute(_SHADOW_DELETE, (request_id,))
        await db.execute(_SHADOW_UPSERT, (request_id,))
        async with db.execute(_SHADOW_ITEM_KEYS, (request_id,)) as cursor:
            row = await cursor.fetchone()
        item_keys = json.loads(row[0]) if row is not None and row[0] else []
        if item_keys:
            await _sync_barcodes(db, item_keys)
        return len(events), events

    async def _swap(
        self, db: aiosqlite.Connection, request_id: str, entities: list[str]
    ) -> tuple[int, list[CatalogEvent]]:
        if set(entities) >= set(ENTITIES):
            await db.execute(_REPLACE_DELETE_ALL)
        else:
            await db.execute(_REPLACE_DELETE, (json.dumps(entities),))
        cursor = await db.execute(_REPLACE_INSERT, (request_id, json.dumps(entities)))
        inserted = max(cursor.rowcount, 0)
        if "items" in entities:
            await db.execute("DELETE FROM item_barcodes")
            await db.execute(_BARCODES_ALL)
        events = [CatalogEvent(e, None, "*", "reload", None, "reinit") for e in entities]
        return inserted, events

    async def _cursors(self, db: aiosqlite.Connection) -> dict[str, int]:
        async with db.execute("SELECT scope, seq FROM catalog_cursors") as cursor:
            return {str(scope): int(seq) for scope, seq in await cursor.fetchall()}

    # -- item edits ---------------------------------------------------------------------

    async def edit_item(
        self, outbox: Outbox, item_id: str, changes: Mapping[str, CatalogValue]
    ) -> Submitted:
        """Write ``changes`` into the item at once (``local_edit`` = 1) and store an
        ``item_edit`` document based on the replica's version, in one transaction.

        Raises ``unknown_item`` if the replica has no such item, and the protocol's errors
        (code, field, reason) if the changes are not a valid ``ItemChanges``; then nothing
        is written.
        """
        found: list[tuple[str, dict[str, CatalogValue]]] = []
        events: list[CatalogEvent] = []

        async def body(db: aiosqlite.Connection) -> dict[str, object]:
            async with db.execute(_ITEM_FOR_EDIT, (item_id, self.center_id)) as cursor:
                row = await cursor.fetchone()
            if row is None:
                raise UnknownItemError(f"the catalog has no item {item_id!r}", field="item_id")
            entry = entry_of(row)
            found.append((entry.scope, entry.state))
            return {"item_id": item_id, "base_version": entry.version, "changes": dict(changes)}

        async def write(db: aiosqlite.Connection, submitted: Submitted) -> None:
            scope, state = found[0]
            merged = {**state, **{k: v for k, v in changes.items() if v is not None}}
            await db.execute(_LOCAL_EDIT, (_json(merged), item_id, scope))
            if "barcodes" in changes:
                await _sync_barcodes(db, [item_id])
            events.append(CatalogEvent("items", item_id, scope, "upsert", None, "local_edit"))

        submitted = await outbox.submit_with("item_edit", body, write)
        self.events.publish(events)
        return submitted


async def _sync_barcodes(db: aiosqlite.Connection, item_keys: list[str]) -> None:
    keys = json.dumps(item_keys)
    await db.execute(_UNBARCODE, (keys,))
    await db.execute(_BARCODES_OF, (keys,))


def _transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """``work`` in one ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on any error); runs
    on the connection's thread."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result
