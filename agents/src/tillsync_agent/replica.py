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

import json
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Literal

import aiosqlite
from pydantic_core import to_json

from tillsync_protocol import (
    ENTITIES,
    GLOBAL_SCOPE,
    CatalogChangeBody,
    DeltaPageBody,
    TillsyncError,
)
from tillsync_protocol.codec import CheckedDeltaPage
from tillsync_protocol.control import CatalogValue

from .catalog_events import CatalogEvent, CatalogEvents, CatalogSubscription, EventSource
from .catalog_reader import _CURSORS, CatalogReader, entry_of
from .outbox import Outbox, Submitted, now_ms
from .store import CATALOG_TABLE, Store

__all__ = [
    "Applied",
    "ApplyMode",
    "ApplyStatus",
    "BarcodeRow",
    "DropRow",
    "NextRow",
    "NotStagedError",
    "Replica",
    "ShadowRow",
    "StagedPage",
    "UnknownItemError",
]


ApplyStatus = Literal["applied", "duplicate", "gap", "ignored"]
ApplyMode = Literal["delta", "update", "replace"]

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
# An item whose barcodes stay as they were (a price change): the upsert's update, and its
# barcodes need no rebuild. No row changed: the upsert's insert, or a barcode change.
_UPDATE_SAME_BARCODES = """
UPDATE catalog SET version = ?, scope_seq = ?, state = ?, local_edit = 0
WHERE entity = 'items' AND key = ? AND scope = ? AND scope_seq <= ?
    AND json_extract(state, '$.barcodes') IS json_extract(?, '$.barcodes')
"""
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

# Staging: one request at a time (catalog_staging names it); starting one clears what an
# interrupted run left (each DELETE of a whole table is SQLite's truncate).
_CLEAR_STAGED = tuple(
    f"DELETE FROM {table}"
    for table in (
        "catalog_staging",
        "catalog_shadow",
        "catalog_next",
        "item_barcodes_next",
        "catalog_next_drops",
    )
)
_BEGIN_STAGING = "INSERT INTO catalog_staging (request_id, mode, started_at) VALUES (?, ?, ?)"
_STAGING = "SELECT request_id, mode FROM catalog_staging"
_STAGE = """
INSERT OR IGNORE INTO catalog_shadow
    (page_no, idx, entity, key, scope, op, version, scope_seq, state, kept)
VALUES {rows}
"""
_SHADOW_COUNT = "SELECT COUNT(*) FROM catalog_shadow"
# Should a key come twice in one answer, only its latest change counts. Central's answers
# have each key once, so the (index-only) check comes first and the delete rarely runs.
_SHADOW_REPEATS = """
SELECT 1 FROM catalog_shadow GROUP BY entity, key, scope HAVING COUNT(*) > 1 LIMIT 1
"""
_SHADOW_DEDUPE = """
DELETE FROM catalog_shadow AS s WHERE EXISTS (
    SELECT 1 FROM catalog_shadow AS t
    WHERE t.entity = s.entity AND t.key = s.key AND t.scope = s.scope
        AND (t.scope_seq, t.page_no, t.idx) > (s.scope_seq, s.page_no, s.idx))
"""
# What applying a delta will change (for the notifications), before applying it.
_SHADOW_EFFECTS = """
SELECT s.entity, s.key, s.scope, s.op = 'upsert' AND s.kept = 1, s.version
FROM catalog_shadow AS s LEFT JOIN catalog AS c
    ON c.entity = s.entity AND c.key = s.key AND c.scope = s.scope
WHERE (c.scope_seq IS NULL OR s.scope_seq >= c.scope_seq)
    AND NOT ((s.op = 'delete' OR s.kept = 0) AND c.key IS NULL)
ORDER BY s.page_no, s.idx
"""
_SHADOW_DELETE = """
DELETE FROM catalog WHERE EXISTS (
    SELECT 1 FROM catalog_shadow AS s WHERE (s.op = 'delete' OR s.kept = 0)
        AND s.entity = catalog.entity AND s.key = catalog.key AND s.scope = catalog.scope
        AND s.scope_seq >= catalog.scope_seq)
"""
_SHADOW_UPSERT = """
INSERT INTO catalog (entity, key, scope, version, scope_seq, state, local_edit)
SELECT entity, key, scope, version, scope_seq, state, 0 FROM catalog_shadow
WHERE op = 'upsert' AND kept = 1 ORDER BY page_no, idx
ON CONFLICT (entity, key, scope) DO UPDATE SET version = excluded.version,
    scope_seq = excluded.scope_seq, state = excluded.state, local_edit = 0
WHERE excluded.scope_seq >= catalog.scope_seq
"""
_SHADOW_ITEM_KEYS = """
SELECT json_group_array(DISTINCT key) FROM catalog_shadow WHERE entity = 'items'
"""
# A replace stages the next catalog itself: of a key staged twice, the latest change wins
# (the greatest scope_seq, then the last staged), as the shadow's dedupe does.
_NEXT_UPSERT = """
INSERT INTO catalog_next (entity, key, scope, version, scope_seq, state)
VALUES {rows}
ON CONFLICT (entity, key, scope) DO UPDATE SET version = excluded.version,
    scope_seq = excluded.scope_seq, state = excluded.state
WHERE excluded.scope_seq >= catalog_next.scope_seq
"""
# The barcode of two items goes to the center's row, then to the greatest key (as
# _BARCODE_SELECT's order does).
_NEXT_BARCODE = """
INSERT INTO item_barcodes_next (barcode, item_key, center) VALUES {rows}
ON CONFLICT (barcode) DO UPDATE SET item_key = excluded.item_key, center = excluded.center
WHERE (excluded.center, excluded.item_key)
    > (item_barcodes_next.center, item_barcodes_next.item_key)
"""
_NEXT_DROP = "INSERT INTO catalog_next_drops (entity, key, scope, scope_seq) VALUES {rows}"
_NEXT_COUNT = "SELECT COUNT(*) FROM catalog_next"
# Staged deletes (and rows filtered out by labels) of keys not staged as kept rows count
# as received too; then they remove a kept row staged at the same or an older scope_seq.
_NEXT_DROPS_ALONE = """
SELECT COUNT(*) FROM (SELECT DISTINCT entity, key, scope FROM catalog_next_drops AS d
    WHERE NOT EXISTS (SELECT 1 FROM catalog_next AS n
        WHERE n.entity = d.entity AND n.key = d.key AND n.scope = d.scope))
"""
_NEXT_DROP_ROWS = """
DELETE FROM catalog_next WHERE rowid IN (
    SELECT n.rowid FROM catalog_next_drops AS d JOIN catalog_next AS n
        ON n.entity = d.entity AND n.key = d.key AND n.scope = d.scope
    WHERE d.scope_seq >= n.scope_seq)
"""
_NEXT_FOREIGN = "DELETE FROM catalog_next WHERE entity NOT IN (SELECT value FROM json_each(?))"
_NEXT_KEEP_OTHERS = """
INSERT INTO catalog_next (entity, key, scope, version, scope_seq, state, local_edit)
SELECT entity, key, scope, version, scope_seq, state, local_edit FROM catalog
WHERE entity NOT IN (SELECT value FROM json_each(?))
"""
_NEXT_ITEMS = "SELECT COUNT(*) FROM catalog_next WHERE entity = 'items'"
_BARCODES_FROM_NEXT = """
INSERT INTO item_barcodes (barcode, item_key) SELECT barcode, item_key FROM item_barcodes_next
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


ShadowRow = tuple[int, int, str, str, str, str, int, int, str | None, int]
"""A ``catalog_shadow`` row (a delta or update): page_no, idx, entity, key, scope, op,
version, scope_seq, state (JSON text, None for a delete), kept."""
NextRow = tuple[str, str, str, int, int, str]
"""A ``catalog_next`` row (a replace): entity, key, scope, version, scope_seq, state."""
DropRow = tuple[str, str, str, int]
"""A ``catalog_next_drops`` row: entity, key, scope, scope_seq."""
BarcodeRow = tuple[str, str, int]
"""An ``item_barcodes_next`` row: barcode, item_key, center (1: the center's row)."""


@dataclass(frozen=True)
class StagedPage:
    """One ``delta_page`` ready for staging: plain tuples of strings and integers (states as
    JSON text), so that pages waiting to be staged cost the garbage collector next to
    nothing, unlike the decoded models they come from."""

    request_id: str
    page_no: int
    changes: int
    """Changes in the page, of every scope."""
    foreign: int
    """Changes of scopes this register does not follow (left out of the rows)."""
    rows: list[ShadowRow] = field(default_factory=list)
    """A delta or update: the shadow's rows."""
    next_rows: list[NextRow] = field(default_factory=list)
    """A replace: the kept rows of the next catalog…"""
    barcodes: list[BarcodeRow] = field(default_factory=list)
    """… the barcodes of those items…"""
    drops: list[DropRow] = field(default_factory=list)
    """… and its deletes and rows filtered out by labels."""


@dataclass
class _Staging:
    """The request being staged, as this process began it."""

    request_id: str
    mode: ApplyMode
    next_rows: int = 0
    """Rows written into ``catalog_next`` (a replace): equal to its count unless a key came
    twice, in which case the staged barcodes are not trusted."""
    drops: int = 0


class NotStagedError(TillsyncError):
    """Pages or an apply for a request that is not the one being staged."""

    code = "not_staged"


def _json(state: Mapping[str, CatalogValue] | None) -> str:
    """A state as the replica's JSON text: compact, non-ASCII as is (the same text as
    ``json.dumps(state, ensure_ascii=False, separators=(",", ":"))``, which a property test
    checks on every kind of catalog value, 4–5× faster)."""
    return to_json(state if type(state) is dict else dict(state or {})).decode()


def _barcodes(state: Mapping[str, CatalogValue]) -> list[str]:
    """An item's barcodes as ``json_each(state, '$.barcodes')`` with ``type = 'text'`` sees
    them (what ``_BARCODE_SELECT`` indexes)."""
    value = state.get("barcodes")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [b for b in value if isinstance(b, str)]
    if isinstance(value, dict):
        return [b for b in value.values() if isinstance(b, str)]
    return []


@dataclass
class _Applying:
    """What one :meth:`Replica.apply_changes` transaction has done so far."""

    cursors: dict[str, int]
    """Every scope's position as of now: as known before, read, or moved."""
    moved: dict[str, int] = field(default_factory=dict)
    """The cursors to write, once, at the end."""
    statuses: list[ApplyStatus] = field(default_factory=list)
    events: list[CatalogEvent] = field(default_factory=list)


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
        self._staging: _Staging | None = None
        self._known_cursors: dict[str, int] = {}
        """Committed cursors, as real-time changes last read or moved them: one statement
        less per change. Written only under the write lock; :meth:`apply_staged`, which
        moves cursors by its own statements, empties it. A dict once assigned here is never
        changed (each transaction works on a copy), so :meth:`reported_cursors` may read it
        without the lock."""

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

    async def reported_cursors(self) -> dict[str, int]:
        """The cursors as of the last commit, for a heartbeat: from memory once a real-time
        change has been applied since the last delta or reinit (no trip to the reader's
        thread: in steady state a beat reads nothing), else read. A scope at 0 is left
        out: absent and 0 both mean nothing applied yet."""
        known = self._known_cursors
        if all(scope in known for scope in self.scopes):
            return {scope: seq for scope, seq in known.items() if seq}
        return await self.cursors()

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

        def work(db: sqlite3.Connection) -> _Applying:
            applying = _Applying(dict(self._known_cursors))
            for change in changes:
                applying.statuses.append(self._apply_one(db, change, applying))
            for scope, seq in applying.moved.items():
                db.execute(_SET_CURSOR, (scope, seq))
            return applying

        def committed(applying: _Applying) -> None:
            self._known_cursors = applying.cursors
            self.events.publish(applying.events)

        return (await self._store.write_in_thread(work, committed)).statuses

    def _apply_one(
        self, db: sqlite3.Connection, change: CatalogChangeBody, applying: _Applying
    ) -> ApplyStatus:
        """One change inside :meth:`apply_changes`' transaction."""
        if change.scope not in self.scopes:
            return "ignored"
        position = applying.cursors.get(change.scope)
        if position is None:
            # Every followed scope's cursor in the one read: then a heartbeat can take
            # them all from memory (see reported_cursors).
            stored = {str(scope): int(seq) for scope, seq in db.execute(_CURSORS)}
            for scope in self.scopes:
                applying.cursors.setdefault(scope, stored.get(scope, 0))
            position = applying.cursors[change.scope]
        if change.scope_seq <= position:
            return "duplicate"
        if change.scope_seq > position + 1:
            return "gap"
        kept = change.op == "upsert" and self.keeps(change.entity, change.state)
        if kept:
            changed, rebuild = self._upsert(db, change)
        else:
            where = (change.entity, change.key, change.scope, change.scope_seq)
            changed, rebuild = db.execute(_DELETE, where).rowcount > 0, change.entity == "items"
        applying.cursors[change.scope] = applying.moved[change.scope] = change.scope_seq
        if changed:
            if rebuild:
                keys = json.dumps([change.key])
                db.execute(_UNBARCODE, (keys,))
                db.execute(_BARCODES_OF, (keys,))
            op: Literal["upsert", "delete"] = "upsert" if kept else "delete"
            applying.events.append(
                CatalogEvent(change.entity, change.key, change.scope, op, change.version, "change")
            )
        return "applied"

    @staticmethod
    def _upsert(db: sqlite3.Connection, change: CatalogChangeBody) -> tuple[bool, bool]:
        """Write a kept row: whether it changed, and whether its item's barcodes must be
        rebuilt. An item whose barcodes stay (a price change) is one statement, not three."""
        state = _json(change.state)
        if change.entity == "items":
            same = (change.version, change.scope_seq, state, change.key, change.scope)
            if db.execute(_UPDATE_SAME_BARCODES, (*same, change.scope_seq, state)).rowcount:
                return True, False
        row = (change.entity, change.key, change.scope, change.version, change.scope_seq, state)
        return db.execute(_UPSERT, row).rowcount > 0, change.entity == "items"

    # -- deltas and reinits -------------------------------------------------------------

    async def begin_staging(self, request_id: str, mode: ApplyMode = "delta") -> None:
        """Clear what an interrupted run staged and stage ``request_id`` from now on: a
        ``replace`` into the next catalog itself, a ``delta`` or ``update`` into the shadow."""

        def begin(db: sqlite3.Connection) -> None:
            for statement in _CLEAR_STAGED:
                db.execute(statement)
            db.execute(_BEGIN_STAGING, (request_id, mode, now_ms()))

        self._staging = None
        await self._store.write_in_thread(begin)
        self._staging = _Staging(request_id, mode)

    async def stage(self, request_id: str, page: DeltaPageBody) -> int:
        """Write one page of the request being staged (a redelivered page changes nothing);
        returns the number of changes of scopes this register does not follow (they are
        left out)."""
        staged = self.shadow_rows(request_id, page)
        await self.stage_rows([staged])
        return staged.foreign

    def shadow_rows(self, request_id: str, page: DeltaPageBody | CheckedDeltaPage) -> StagedPage:
        """A page of the request being staged as the rows :meth:`stage_rows` writes: the
        decoded model, or the same page checked without its models (what the service
        stages: ``codec.decode_control_pages``); both give the same rows."""
        staging = self._staging_of(request_id)
        if isinstance(page, CheckedDeltaPage):
            changes = page.changes
        else:
            changes = [
                (c.scope, c.scope_seq, c.entity, c.key, c.op, c.version, c.state)
                for c in page.changes
            ]
        scopes = self.scopes
        filtering = bool(self.labels)
        keeps = self.keeps
        page_no = page.page_no
        foreign = 0
        if staging.mode != "replace":
            rows: list[ShadowRow] = []
            add = rows.append
            for scope, seq, entity, key, op, version, state in changes:
                if scope not in scopes:
                    foreign += 1
                    continue
                delete = op == "delete"
                add(
                    (
                        page_no,
                        len(rows),
                        entity,
                        key,
                        scope,
                        op,
                        version,
                        seq,
                        None if delete else _json(state),
                        int(delete or not filtering or keeps(entity, state)),
                    )
                )
            return StagedPage(request_id, page_no, len(changes), foreign, rows=rows)
        next_rows: list[NextRow] = []
        barcodes: list[BarcodeRow] = []
        drops: list[DropRow] = []
        add_row, add_barcode, add_drop = next_rows.append, barcodes.append, drops.append
        # The loop runs for every change of a reinit (110,000 in the bench): its names are
        # locals, and _json's work is inlined (a checked state is always a plain dict).
        for scope, seq, entity, key, op, version, state in changes:
            if scope not in scopes:
                foreign += 1
                continue
            if op == "delete" or state is None or (filtering and not keeps(entity, state)):
                add_drop((entity, key, scope, seq))
                continue
            add_row((entity, key, scope, version, seq, to_json(state).decode()))
            if entity == "items":
                found = state.get("barcodes")
                if type(found) is list:
                    center = int(scope != GLOBAL_SCOPE)
                    for barcode in found:
                        if type(barcode) is str:
                            add_barcode((barcode, key, center))
                elif found is not None:
                    center = int(scope != GLOBAL_SCOPE)
                    barcodes.extend([(barcode, key, center) for barcode in _barcodes(state)])
        return StagedPage(
            request_id,
            page_no,
            len(changes),
            foreign,
            next_rows=next_rows,
            barcodes=barcodes,
            drops=drops,
        )

    def _staging_of(self, request_id: str) -> _Staging:
        staging = self._staging
        if staging is None or staging.request_id != request_id:
            raise NotStagedError(
                f"request {request_id!r} is not the one being staged "
                f"({'none' if staging is None else repr(staging.request_id)})",
                field="request_id",
            )
        return staging

    async def stage_rows(self, pages: Sequence[StagedPage]) -> None:
        """Write pages (from :meth:`shadow_rows`) in one transaction: one commit for pages
        that arrived together, however far they ran ahead of staging."""
        if not pages:
            return
        staging = self._staging_of(pages[0].request_id)
        for page in pages:
            self._staging_of(page.request_id)

        def insert(db: sqlite3.Connection) -> None:
            # The pages' rows together, in order: as few statements as the limit allows.
            _insert_rows(db, _STAGE, 10, [r for page in pages for r in page.rows])
            _insert_rows(db, _NEXT_UPSERT, 6, [r for page in pages for r in page.next_rows])
            _insert_rows(db, _NEXT_BARCODE, 3, [r for page in pages for r in page.barcodes])
            _insert_rows(db, _NEXT_DROP, 4, [r for page in pages for r in page.drops])

        def counted(_: None) -> None:
            staging.next_rows += sum(len(page.next_rows) for page in pages)
            staging.drops += sum(len(page.drops) for page in pages)

        await self._store.write_in_thread(insert, counted)

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
        ``replace`` makes the staged next catalog the catalog, keeping only the rows of the
        entities it does not replace. Cursors are set from ``cursors`` (None: they stay, as
        after a partial sync). Raises ``not_staged`` if ``request_id`` is not what is staged,
        or was staged for a replace and is applied as a delta or update, or the reverse.
        """
        staging = self._staging
        replacing = mode == "replace"

        async def work(db: aiosqlite.Connection) -> tuple[Applied, list[CatalogEvent]]:
            self._known_cursors = {}  # read again after this, committed or not
            async with db.execute(_STAGING) as cursor:
                row = await cursor.fetchone()
            # A delta and an update are staged alike (the shadow), a replace is not.
            if row is None or row[0] != request_id or (row[1] == "replace") != replacing:
                staged = "nothing" if row is None else f"request {row[0]!r} ({row[1]})"
                raise NotStagedError(
                    f"cannot apply request {request_id!r} ({mode}): {staged} is staged",
                    field="request_id",
                )
            if replacing:
                known = staging if staging and staging.request_id == request_id else None
                received, applied, events = await self._swap(db, sorted(entities), known)
            else:
                async with db.execute(_SHADOW_REPEATS) as cursor:
                    repeats = await cursor.fetchone() is not None
                if repeats:
                    await db.execute(_SHADOW_DEDUPE)
                async with db.execute(_SHADOW_COUNT) as cursor:
                    counted = await cursor.fetchone()
                received = 0 if counted is None else int(counted[0])
                applied, events = await self._merge(db, mode)
            new_cursors = dict(await self._cursors(db))
            for scope, seq in (cursors or {}).items():
                if scope in self.scopes:
                    await db.execute(_SET_CURSOR, (scope, seq))
                    new_cursors[scope] = seq
            for statement in _CLEAR_STAGED:
                await db.execute(statement)
            return Applied(received, applied, new_cursors), events

        def done(result: tuple[Applied, list[CatalogEvent]]) -> None:
            self._staging = None
            self.events.publish(result[1])

        result, _ = await self._store.write(work, after=done)
        return result

    async def _merge(
        self, db: aiosqlite.Connection, mode: ApplyMode
    ) -> tuple[int, list[CatalogEvent]]:
        source: EventSource = "delta" if mode == "delta" else "reinit"
        async with db.execute(_SHADOW_EFFECTS) as cursor:
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
        await db.execute(_SHADOW_DELETE)
        await db.execute(_SHADOW_UPSERT)
        async with db.execute(_SHADOW_ITEM_KEYS) as cursor:
            row = await cursor.fetchone()
        item_keys = json.loads(row[0]) if row is not None and row[0] else []
        if item_keys:
            await _sync_barcodes(db, item_keys)
        return len(events), events

    async def _swap(
        self, db: aiosqlite.Connection, entities: list[str], staging: _Staging | None
    ) -> tuple[int, int, list[CatalogEvent]]:
        """The staged next catalog becomes the catalog (DROP, then RENAME: no row is copied
        but the rows of entities not replaced); returns received, applied and the events.
        ``staging`` is this process's record of the staging (None: not known here)."""
        chosen = json.dumps(entities)
        received = staged = await _count(db, _NEXT_COUNT)
        drops = staging is None or staging.drops > 0
        if drops:
            received += await _count(db, _NEXT_DROPS_ALONE)
            await db.execute(_NEXT_DROP_ROWS)
        everything = set(entities) >= set(ENTITIES)
        if not everything:
            await db.execute(_NEXT_FOREIGN, (chosen,))
        inserted = await _count(db, _NEXT_COUNT)
        if not everything:
            await db.execute(_NEXT_KEEP_OTHERS, (chosen,))
        await db.execute("DROP TABLE catalog")
        await db.execute("ALTER TABLE catalog_next RENAME TO catalog")
        await db.execute(CATALOG_TABLE.format(name="catalog_next"))
        if "items" in entities:
            await db.execute("DELETE FROM item_barcodes")
            # The staged barcodes are those of the catalog's items unless a key came twice
            # or a staged row was dropped: then they are rebuilt from the items' states.
            exact = not drops and staging is not None and staging.next_rows == staged
            await db.execute(_BARCODES_FROM_NEXT if exact else _BARCODES_ALL)
        events = [CatalogEvent(e, None, "*", "reload", None, "reinit") for e in entities]
        return received, inserted, events

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


BULK_ROWS = 1000
"""Rows written by one statement when pages are staged (a multi-row ``VALUES``; a page of
the default size is one statement, prepared once and then reused), fewer if SQLite's limit
on parameters (32,766 by default) says so."""


def _insert_rows(
    db: sqlite3.Connection, sql: str, width: int, rows: Sequence[tuple[object, ...]]
) -> None:
    """``rows`` of ``width`` values through ``sql`` (whose ``{rows}`` is a ``VALUES``
    list), as few statements as possible, in order (an upsert sees the rows of one
    statement one after the other, as ``executemany`` would give them).

    Not ``executemany``: it takes the GIL back after every row, and while the event loop is
    busy decoding the next pages each of those waits up to the interpreter's switch interval
    (5 ms): staging a reinit took 3-4 times its SQLite work. One statement per thousand
    rows takes it back once.
    """
    if not rows:
        return
    limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
    step = max(1, min(BULK_ROWS, limit))
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        db.execute(_bulk_sql(sql, width, len(chunk)), list(chain.from_iterable(chunk)))


@lru_cache(maxsize=32)
def _bulk_sql(sql: str, width: int, count: int) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return sql.format(rows=", ".join([row] * count))


async def _count(db: aiosqlite.Connection, query: str) -> int:
    async with db.execute(query) as cursor:
        row = await cursor.fetchone()
    return 0 if row is None else int(row[0])


async def _sync_barcodes(db: aiosqlite.Connection, item_keys: list[str]) -> None:
    keys = json.dumps(item_keys)
    await db.execute(_UNBARCODE, (keys,))
    await db.execute(_BARCODES_OF, (keys,))
