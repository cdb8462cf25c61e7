"""Item edits made on registers, applied by ingest in the transaction that stores them.

An ``item_edit`` document names an item and the ``version`` of it the register's edit was
based on. In the ingest transaction that first stores the document, the edit is applied
to the item's row if that row's version is still ``base_version``: its changes merged
into the state, validated as an item, written like any edit (changelog, counter,
NOTIFY), so it fans out to every register of the scope, the editor included. Otherwise
nothing changes, a ``catalog_conflicts`` row records what was proposed and the document
is rejected in the ack with the row's code:

* ``edit_conflict`` — the item changed since (central won);
* ``unknown_item`` — no live item with that id in the register's center or globally;
* ``invalid_value`` — the merged state is not a valid item.

The item is the register's center's row if a live one exists there, else the global
row. A redelivered document is a duplicate and is not applied again; its rejection is
read back from ``catalog_conflicts`` (:func:`previous_refusals`), so the register is told
the same thing every time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from tillsync_protocol import GLOBAL_SCOPE, ConflictError, ItemEdit, RejectedError, TillsyncError

from .catalog import Edit, current_rows, lock_scope, scope_order, write_edits
from .catalog_models import validate_state
from .dead_letters import Conn

__all__ = ["ItemEditResult", "apply_item_edits", "edit_scopes", "previous_refusals"]

log = structlog.get_logger(__name__)

Key = tuple[str, int]

_WHERE = """
SELECT scope, key FROM catalog_entities
WHERE entity = 'items' AND NOT deleted AND key = ANY($1::text[]) AND scope = ANY($2::text[])
"""
_INSERT_CONFLICTS = """
INSERT INTO catalog_conflicts (code, register_id, seq, doc_id, scope, key, base_version,
                               current_version, proposed, reason)
SELECT u.code, u.register_id, u.seq, u.doc_id, u.scope, u.key, u.base_version,
       u.current_version, u.proposed::jsonb, u.reason
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::text[],
            $7::bigint[], $8::bigint[], $9::text[], $10::text[])
     AS u(code, register_id, seq, doc_id, scope, key, base_version, current_version,
          proposed, reason)
ON CONFLICT (register_id, seq) DO NOTHING
"""
_PREVIOUS = """
SELECT c.register_id, c.seq, c.code, c.reason
FROM catalog_conflicts c JOIN unnest($1::text[], $2::bigint[]) AS k(register_id, seq)
     USING (register_id, seq)
"""


@dataclass
class ItemEditResult:
    applied: int = 0
    refused: dict[Key, TillsyncError] | None = None


@dataclass(frozen=True)
class _Refusal:
    document: ItemEdit
    scope: str | None
    current_version: int | None
    error: TillsyncError


def _error(code: str, reason: str) -> TillsyncError:
    if code == "edit_conflict":
        return ConflictError(reason, field="body.base_version", code=code)
    if code == "unknown_item":
        return RejectedError(reason, field="body.item_id", code=code)
    return RejectedError(reason, field="body.changes", code=code)


async def edit_scopes(conn: Conn, documents: Sequence[ItemEdit]) -> dict[Key, str]:
    """Where each edited item lives: its center's live row if any, else global."""
    keys = sorted({d.body.item_id for d in documents})
    centers = sorted({d.center_id for d in documents})
    rows = await conn.fetch(_WHERE, keys, centers)
    in_center = {(r["scope"], r["key"]) for r in rows}
    return {
        (d.register_id, d.seq): d.center_id
        if (d.center_id, d.body.item_id) in in_center
        else GLOBAL_SCOPE
        for d in documents
    }


async def apply_item_edits(conn: Conn, documents: Sequence[ItemEdit]) -> ItemEditResult:
    """Apply newly stored item edits inside the ingest transaction; the refused ones."""
    result = ItemEditResult(refused={})
    if not documents:
        return result
    scope_of = await edit_scopes(conn, documents)
    by_scope: dict[str, list[ItemEdit]] = {}
    for document in sorted(documents, key=lambda d: (d.register_id, d.seq)):
        by_scope.setdefault(scope_of[(document.register_id, document.seq)], []).append(document)
    refusals: list[_Refusal] = []
    for scope in sorted(by_scope, key=scope_order):
        await lock_scope(conn, scope)
        for document in by_scope[scope]:
            refusal = await _apply_one(conn, scope, document)
            if refusal is None:
                result.applied += 1
            else:
                refusals.append(refusal)
    await _record(conn, refusals)
    for refusal in refusals:
        assert result.refused is not None
        result.refused[(refusal.document.register_id, refusal.document.seq)] = refusal.error
    return result


async def _apply_one(conn: Conn, scope: str, document: ItemEdit) -> _Refusal | None:
    body = document.body
    row = (await current_rows(conn, scope, [("items", body.item_id)])).get(("items", body.item_id))
    if row is None or row.deleted or row.state is None:
        reason = f"no item {body.item_id!r} in the catalog of center {document.center_id!r}"
        return _Refusal(document, None, None, _error("unknown_item", reason))
    if row.version != body.base_version:
        reason = (
            f"item {body.item_id!r} is at version {row.version}, the edit was based on "
            f"version {body.base_version}: central's state stands"
        )
        return _Refusal(document, scope, row.version, _error("edit_conflict", reason))
    merged = {**row.state, **body.changes.model_dump(mode="json", exclude_none=True)}
    try:
        state = validate_state("items", merged)
    except TillsyncError as exc:
        reason = f"the edited item would be invalid: {exc}"
        return _Refusal(document, scope, row.version, _error("invalid_value", reason))
    edit = Edit(scope, "items", body.item_id, "upsert", state)
    changes = await write_edits(conn, [edit], f"register:{document.register_id}")
    log.info(
        "item edit applied",
        register_id=document.register_id,
        seq=document.seq,
        doc_id=document.doc_id,
        item_id=body.item_id,
        scope=scope,
        version=changes[0].version if changes else row.version,
    )
    return None


async def _record(conn: Conn, refusals: list[_Refusal]) -> None:
    if not refusals:
        return
    for r in refusals:
        log.warning(
            "item edit refused",
            code=r.error.code,
            register_id=r.document.register_id,
            seq=r.document.seq,
            doc_id=r.document.doc_id,
            item_id=r.document.body.item_id,
            base_version=r.document.body.base_version,
            current_version=r.current_version,
        )
    await conn.execute(
        _INSERT_CONFLICTS,
        [r.error.code for r in refusals],
        [r.document.register_id for r in refusals],
        [r.document.seq for r in refusals],
        [r.document.doc_id for r in refusals],
        [r.scope for r in refusals],
        [r.document.body.item_id for r in refusals],
        [r.document.body.base_version for r in refusals],
        [r.current_version for r in refusals],
        [
            json.dumps(r.document.body.changes.model_dump(mode="json", exclude_none=True))
            for r in refusals
        ],
        [r.error.reason for r in refusals],
    )


async def previous_refusals(conn: Conn, keys: Iterable[Key]) -> dict[Key, TillsyncError]:
    """How item edits stored earlier were refused (for their redeliveries)."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    rows = await conn.fetch(_PREVIOUS, [k[0] for k in wanted], [k[1] for k in wanted])
    return {(r["register_id"], r["seq"]): _error(r["code"], r["reason"]) for r in rows}
