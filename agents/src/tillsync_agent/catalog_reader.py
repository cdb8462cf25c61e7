"""Reading the catalog replica: what POS apps ask (item, barcode, search, price…).

Always through a **read-only** connection, never the writer: a reader sees only committed
snapshots (a delta being applied is invisible until its one commit), and never becomes the
second writer SQLite 3.40's WAL-reset bug needs. The running agent keeps one open
(:attr:`Agent.replica`); ``tillsync-agent catalog`` opens its own.

Where a key exists both globally and in this register's center, the center's row wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosqlite

from tillsync_protocol import GLOBAL_SCOPE
from tillsync_protocol.control import CatalogValue

from .outbox import now_ms
from .store import open_readonly_async

__all__ = ["CatalogEntry", "CatalogReader", "Price"]

_COLUMNS = "entity, key, scope, version, scope_seq, state, local_edit"
# The center's row first: ORDER BY (scope = 'global') puts 0 (the center) before 1.
_GET = f"""
SELECT {_COLUMNS} FROM catalog WHERE entity = ? AND key = ? AND scope IN (?, 'global')
ORDER BY scope = 'global' LIMIT 1
"""
_ALL = f"""
SELECT {_COLUMNS} FROM catalog AS c WHERE entity = ? AND scope IN (?, 'global')
    AND NOT (scope = 'global' AND EXISTS (
        SELECT 1 FROM catalog AS o WHERE o.entity = c.entity AND o.key = c.key AND o.scope = ?))
ORDER BY key
"""
_BARCODE = "SELECT item_key FROM item_barcodes WHERE barcode = ?"
_SEARCH = f"""
SELECT {_COLUMNS} FROM catalog AS c
WHERE entity = 'items' AND scope IN (?, 'global')
    AND NOT (scope = 'global' AND EXISTS (
        SELECT 1 FROM catalog AS o WHERE o.entity = c.entity AND o.key = c.key AND o.scope = ?))
    AND (key = ? OR instr(casefold(json_extract(state, '$.name')), ?) > 0
         OR key IN (SELECT item_key FROM item_barcodes WHERE barcode = ?))
ORDER BY key = ? DESC, casefold(json_extract(state, '$.name')), key
LIMIT ?
"""
_CURSORS = "SELECT scope, seq FROM catalog_cursors"
_COUNTS = "SELECT entity, COUNT(*), SUM(local_edit) FROM catalog GROUP BY entity ORDER BY entity"


@dataclass(frozen=True)
class CatalogEntry:
    """One row of the replica: central's state of ``(entity, key)`` in ``scope``."""

    entity: str
    key: str
    scope: str
    version: int
    scope_seq: int
    state: dict[str, CatalogValue]
    local_edit: bool
    """True while this register's own edit awaits central."""

    def to_dict(self) -> dict[str, object]:
        return {
            "entity": self.entity,
            "key": self.key,
            "scope": self.scope,
            "version": self.version,
            "scope_seq": self.scope_seq,
            "state": self.state,
            "local_edit": self.local_edit,
        }


@dataclass(frozen=True)
class Price:
    """The price an item sells at in this register's center, in minor units."""

    item_key: str
    gross_price: int
    currency: str
    source: Literal["center", "global"]
    """``center``: a ``prices`` row of this center overrides the item's global price."""


def entry_of(row: aiosqlite.Row | tuple[object, ...]) -> CatalogEntry:
    entity, key, scope, version, scope_seq, state, local_edit = tuple(row)
    return CatalogEntry(
        entity=str(entity),
        key=str(key),
        scope=str(scope),
        version=int(str(version)),
        scope_seq=int(str(scope_seq)),
        state=json.loads(str(state)),
        local_edit=bool(local_edit),
    )


def _casefold(value: object) -> str | None:
    return value.casefold() if isinstance(value, str) else None


class CatalogReader:
    """Queries over a read-only connection to the agent database."""

    def __init__(self, path: Path, center_id: str) -> None:
        self._path = path
        self.center_id = center_id
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        self._db = await open_readonly_async(self._path)
        # Case-insensitive search beyond ASCII (SQLite's LIKE folds ASCII only).
        await self._db.create_function("casefold", 1, _casefold, deterministic=True)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the catalog reader is not open")
        return self._db

    async def get(self, entity: str, key: str) -> CatalogEntry | None:
        """The row of ``(entity, key)``: this center's if there is one, else the global one."""
        async with self._conn.execute(_GET, (entity, key, self.center_id)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else entry_of(row)

    async def all(self, entity: str) -> list[CatalogEntry]:
        """Every row of ``entity`` (a center row hides the global row of the same key)."""
        params = (entity, self.center_id, self.center_id)
        async with self._conn.execute(_ALL, params) as cursor:
            return [entry_of(row) for row in await cursor.fetchall()]

    async def item(self, key: str) -> CatalogEntry | None:
        return await self.get("items", key)

    async def item_by_barcode(self, barcode: str) -> CatalogEntry | None:
        async with self._conn.execute(_BARCODE, (barcode,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else await self.item(str(row[0]))

    async def search(self, text: str, limit: int = 20) -> list[CatalogEntry]:
        """Items whose key or barcode is ``text`` or whose name contains it (any case)."""
        needle = text.strip()
        if not needle:
            return []
        params = (
            self.center_id,
            self.center_id,
            needle,
            needle.casefold(),
            needle,
            needle,
            limit,
        )
        async with self._conn.execute(_SEARCH, params) as cursor:
            return [entry_of(row) for row in await cursor.fetchall()]

    async def price(self, item_key: str, at: int | None = None) -> Price | None:
        """The item's price here: a ``prices`` row of this center valid at ``at`` (ms,
        default now) overrides the item's ``gross_price``. None for an unknown item."""
        item = await self.item(item_key)
        if item is None:
            return None
        when = now_ms() if at is None else at
        override = await self.get("prices", item_key)
        if override is not None and override.scope != GLOBAL_SCOPE and _valid(override, when):
            amount, currency = override.state.get("gross_price"), override.state.get("currency")
            if isinstance(amount, int) and isinstance(currency, str):
                return Price(item_key, amount, currency, "center")
        amount, currency = item.state.get("gross_price"), item.state.get("currency")
        if not isinstance(amount, int) or isinstance(amount, bool) or not isinstance(currency, str):
            return None
        return Price(item_key, amount, currency, "global")

    async def cursors(self) -> dict[str, int]:
        async with self._conn.execute(_CURSORS) as cursor:
            return {str(scope): int(seq) for scope, seq in await cursor.fetchall()}

    async def counts(self) -> dict[str, dict[str, int]]:
        """Rows and local edits per entity."""
        async with self._conn.execute(_COUNTS) as cursor:
            return {
                str(entity): {"rows": int(rows), "local_edits": int(edits or 0)}
                for entity, rows, edits in await cursor.fetchall()
            }


def _valid(price: CatalogEntry, at: int) -> bool:
    valid_from, valid_to = price.state.get("valid_from"), price.state.get("valid_to")
    if isinstance(valid_from, int) and at < valid_from:
        return False
    return not (isinstance(valid_to, int) and at >= valid_to)
