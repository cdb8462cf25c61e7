"""Editing the central catalog: entity row, changelog row and scope counter, one transaction.

Every writer of a scope first locks that scope's counter row (``catalog_scopes``), reads
the rows it changes, numbers its changes ``last_seq + 1 …``, writes them and moves the
counter, all in one transaction. So ``scope_seq`` is contiguous per scope and commits in
order (a PostgreSQL sequence would leave holes on rollback and could commit out of
order), which is what lets the relay publish in order and a register detect a gap.
Transactions touching several scopes lock them in one order (``global`` first, then the
centers by id), so they cannot deadlock on each other.

An upsert whose state equals the row's live state writes nothing (re-importing a file
publishes nothing); deleting a row that is absent or already deleted writes nothing.
After the changes, ``pg_notify('tillsync_catalog', <scope>)`` wakes the relay at commit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from tillsync_protocol import GLOBAL_SCOPE, InvalidValueError, TillsyncError

from .catalog_models import ENTITY_MODELS, validate_key, validate_state
from .dead_letters import Conn

__all__ = [
    "NOTIFY_CHANNEL",
    "CatalogEditor",
    "CatalogError",
    "Change",
    "Edit",
    "Op",
    "live_state",
    "lock_scope",
    "prepare_edit",
    "scope_order",
    "write_edits",
]

NOTIFY_CHANNEL = "tillsync_catalog"
"""The channel ``pg_notify`` wakes the relay on; the payload is the scope."""

Op = Literal["upsert", "delete"]

_SCOPE = re.compile(r"^(global|[a-z0-9][a-z0-9-]{0,62})$")

_LOCK_SCOPE = "SELECT last_seq FROM catalog_scopes WHERE scope = $1 FOR UPDATE"
_CURRENT = """
SELECT e.entity, e.key, e.version, e.deleted, e.state
FROM catalog_entities e JOIN unnest($2::text[], $3::text[]) AS k(entity, key)
     USING (entity, key)
WHERE e.scope = $1
"""
_INSERT_CHANGELOG = """
INSERT INTO catalog_changelog (scope, scope_seq, entity, key, op, version, state, changed_by)
SELECT $1, u.scope_seq, u.entity, u.key, u.op, u.version, u.state::jsonb, $2
FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[])
     AS u(scope_seq, entity, key, op, version, state)
"""
_UPSERT_ENTITIES = """
INSERT INTO catalog_entities AS e (scope, entity, key, version, scope_seq, state, deleted)
SELECT $1, u.entity, u.key, u.version, u.scope_seq, u.state::jsonb, u.state IS NULL
FROM unnest($2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[])
     AS u(scope_seq, entity, key, version, state)
ON CONFLICT (scope, entity, key) DO UPDATE
SET version = EXCLUDED.version, scope_seq = EXCLUDED.scope_seq, state = EXCLUDED.state,
    deleted = EXCLUDED.deleted, updated_at = now()
"""
_MOVE_COUNTER = "UPDATE catalog_scopes SET last_seq = $2 WHERE scope = $1"
_NOTIFY = "SELECT pg_notify($1, $2)"
# A center's row in the catalog is also the center itself: its scope exists from then on.
_UPSERT_CENTERS = """
INSERT INTO centers (center_id, name)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (center_id) DO UPDATE SET name = EXCLUDED.name
"""
_SELECT_ROW = """
SELECT scope, scope_seq, entity, key, version, state, deleted
FROM catalog_entities WHERE scope = $1 AND entity = $2 AND key = $3
"""


class CatalogError(TillsyncError):
    """An edit the catalog refuses as a whole: ``unknown_scope`` (no such center),
    ``invalid_scope`` (an entity edited outside the scope it lives in)."""

    code = "catalog_error"


@dataclass(frozen=True)
class Edit:
    """One requested change; build it with :func:`prepare_edit` (validated, canonical)."""

    scope: str
    entity: str
    key: str
    op: Op
    state: dict[str, Any] | None = None


@dataclass(frozen=True)
class Change:
    """One committed change: a changelog row."""

    scope: str
    scope_seq: int
    entity: str
    key: str
    op: Op
    version: int
    state: dict[str, Any] | None
    changed_by: str


@dataclass
class _Row:
    version: int
    deleted: bool
    state: dict[str, Any] | None


def scope_order(scope: str) -> tuple[bool, str]:
    """The order scopes are locked in: ``global`` first, then centers by id."""
    return (scope != GLOBAL_SCOPE, scope)


def prepare_edit(
    scope: object, entity: object, key: object, op: object = "upsert", state: object = None
) -> Edit:
    """A checked edit with its canonical state, or a ``TillsyncError`` naming the field
    (arguments are typed ``object``: they often come straight from a file)."""
    if not isinstance(scope, str) or not _SCOPE.match(scope):
        raise InvalidValueError(f"{scope!r} is not a scope: 'global' or a center id", field="scope")
    if not isinstance(entity, str) or entity not in ENTITY_MODELS:
        raise InvalidValueError(
            f"{entity!r} is not a catalog entity (one of {', '.join(ENTITY_MODELS)})",
            field="entity",
        )
    key = validate_key(entity, key)
    if entity == "centers" and scope != GLOBAL_SCOPE:
        raise CatalogError("centers live in the global scope", field="scope", code="invalid_scope")
    if op == "delete":
        if state is not None:
            raise InvalidValueError("a delete carries no state", field="state")
        return Edit(scope, entity, key, "delete")
    if op != "upsert":
        raise InvalidValueError(f"op {op!r} is not 'upsert' or 'delete'", field="op")
    return Edit(scope, entity, key, "upsert", validate_state(entity, state))


async def lock_scope(conn: Conn, scope: str) -> int:
    """Lock the scope's counter row for this transaction; its ``last_seq``."""
    last = await conn.fetchval(_LOCK_SCOPE, scope)
    if last is None:
        raise CatalogError(
            f"no catalog scope {scope!r}: it is 'global' or the id of an existing center "
            "(enroll a register there, or upsert the center in the global scope)",
            field="scope",
            code="unknown_scope",
        )
    return int(last)


async def write_edits(conn: Conn, edits: Sequence[Edit], changed_by: str) -> list[Change]:
    """Apply ``edits`` inside the caller's transaction, in their order per scope; the
    changes written (unchanged upserts and deletes of absent rows write none)."""
    by_scope: dict[str, list[Edit]] = {}
    for edit in edits:
        by_scope.setdefault(edit.scope, []).append(edit)
    changes: list[Change] = []
    for scope in sorted(by_scope, key=scope_order):
        changes.extend(await _write_scope(conn, scope, by_scope[scope], changed_by))
    return changes


async def current_rows(
    conn: Conn, scope: str, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], _Row]:
    pairs = sorted(set(keys))
    rows = await conn.fetch(_CURRENT, scope, [p[0] for p in pairs], [p[1] for p in pairs])
    return {(r["entity"], r["key"]): _Row(r["version"], r["deleted"], r["state"]) for r in rows}


def live_state(row: _Row | None) -> dict[str, Any]:
    """A copy of a row's state from :func:`current_rows`; empty when there is no live row
    (none, or a tombstone)."""
    if row is None or row.deleted or row.state is None:
        return {}
    return dict(row.state)


async def _write_scope(
    conn: Conn, scope: str, edits: Sequence[Edit], changed_by: str
) -> list[Change]:
    last = await lock_scope(conn, scope)
    current = await current_rows(conn, scope, ((e.entity, e.key) for e in edits))
    changes: list[Change] = []
    for edit in edits:
        row = current.get((edit.entity, edit.key))
        live = row is not None and not row.deleted
        if edit.op == "delete" and not live:
            continue
        if edit.op == "upsert" and live and row is not None and row.state == edit.state:
            continue
        version = 1 if row is None else row.version + 1
        last += 1
        changes.append(
            Change(scope, last, edit.entity, edit.key, edit.op, version, edit.state, changed_by)
        )
        current[(edit.entity, edit.key)] = _Row(version, edit.op == "delete", edit.state)
    if changes:
        await _insert(conn, scope, changes, changed_by)
        await conn.execute(_MOVE_COUNTER, scope, last)
        await conn.execute(_NOTIFY, NOTIFY_CHANNEL, scope)
    return changes


def _json(state: dict[str, Any] | None) -> str | None:
    if state is None:
        return None
    return json.dumps(state, ensure_ascii=False, separators=(",", ":"))


async def _insert(conn: Conn, scope: str, changes: list[Change], changed_by: str) -> None:
    states = [_json(c.state) for c in changes]
    await conn.execute(
        _INSERT_CHANGELOG,
        scope,
        changed_by,
        [c.scope_seq for c in changes],
        [c.entity for c in changes],
        [c.key for c in changes],
        [c.op for c in changes],
        [c.version for c in changes],
        states,
    )
    # One statement may not upsert a row twice: the entity row takes its last change.
    final: dict[tuple[str, str], tuple[Change, str | None]] = {}
    for change, state in zip(changes, states, strict=True):
        final[(change.entity, change.key)] = (change, state)
    rows = list(final.values())
    await conn.execute(
        _UPSERT_ENTITIES,
        scope,
        [c.scope_seq for c, _ in rows],
        [c.entity for c, _ in rows],
        [c.key for c, _ in rows],
        [c.version for c, _ in rows],
        [state for _, state in rows],
    )
    centers = [c for c, _ in rows if c.entity == "centers" and c.op == "upsert" and c.state]
    if centers:
        await conn.execute(
            _UPSERT_CENTERS,
            [c.key for c in centers],
            [str(c.state["name"]) if c.state else c.key for c in centers],
        )


class CatalogEditor:
    """Edits of the catalog over a pool: each call is one transaction.

    ``changed_by`` names who edits (an operator, ``import:<file>``…) in the changelog.
    """

    def __init__(self, pool: asyncpg.Pool, *, changed_by: str = "central") -> None:
        self._pool = pool
        self._changed_by = changed_by

    async def apply(self, edits: Sequence[Edit], *, changed_by: str | None = None) -> list[Change]:
        """Apply prepared edits in one transaction; the changes written, in order."""
        if not edits:
            return []
        async with self._pool.acquire() as conn, conn.transaction():
            return await write_edits(conn, edits, changed_by or self._changed_by)

    async def upsert(
        self,
        scope: str,
        entity: str,
        key: str,
        state: object,
        *,
        changed_by: str | None = None,
    ) -> Change:
        """Create or replace one row; the change written, or (state unchanged) the change
        that already holds this state."""
        edit = prepare_edit(scope, entity, key, "upsert", state)
        changes = await self.apply([edit], changed_by=changed_by)
        if changes:
            return changes[0]
        current = await self.get(scope, entity, key)
        assert current is not None  # an unchanged upsert means the live row is there
        return current

    async def delete(
        self, scope: str, entity: str, key: str, *, changed_by: str | None = None
    ) -> Change | None:
        """Delete one row (it stays as a tombstone); None if there was nothing to delete."""
        changes = await self.apply(
            [prepare_edit(scope, entity, key, "delete")], changed_by=changed_by
        )
        return changes[0] if changes else None

    async def get(self, scope: str, entity: str, key: str) -> Change | None:
        """The row's latest change (a tombstone for a deleted row), or None."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_SELECT_ROW, scope, entity, key)
            if row is None:
                return None
            changed_by = await conn.fetchval(
                "SELECT changed_by FROM catalog_changelog WHERE scope = $1 AND scope_seq = $2",
                scope,
                row["scope_seq"],
            )
        return Change(
            row["scope"],
            row["scope_seq"],
            row["entity"],
            row["key"],
            "delete" if row["deleted"] else "upsert",
            row["version"],
            row["state"],
            changed_by or "",
        )
