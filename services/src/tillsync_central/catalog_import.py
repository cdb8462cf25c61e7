"""Importing catalog rows from a file: CSV with a header, or JSON lines.

**CSV** (``.csv``): one entity per file (``--entity``), or an ``entity`` column; a ``key``
column; an optional ``scope`` column (else ``--scope``, default ``global``); every other
column is a field of the state. Cells are converted by the field's type: integers
(money in minor units, ``qty_milli``…) as written, ``12.50`` refused as a float;
booleans ``true/false/1/0/yes/no``; lists ``;``-separated; an empty cell leaves the
field at its default; a cell starting with ``[`` or ``{`` is read as JSON (kit components).

**JSON lines** (``.jsonl``, ``.ndjson``): one object per line,
``{"entity", "key", "scope"?, "op"?, "state"}``; ``op`` is ``upsert`` (default) or
``delete`` (no state); ``--entity`` and ``--scope`` are the defaults for rows without them.

Rows are checked one by one; a bad row is reported with its line number, code, field
and reason, and the good rows are applied in transactions of ``batch_size`` rows. A
batch that fails as a whole (a center deleted meanwhile) is retried row by row so only
the guilty rows are reported.
"""

from __future__ import annotations

import csv
import json
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel

from tillsync_protocol import GLOBAL_SCOPE, TillsyncError

from .catalog import CatalogEditor, Edit, prepare_edit
from .catalog_models import ENTITY_MODELS
from .store import is_transient

__all__ = [
    "CatalogImportError",
    "FileFormat",
    "ImportReport",
    "RowError",
    "count_lines",
    "detect_format",
    "import_file",
]

FileFormat = Literal["csv", "jsonl"]
Kind = Literal["int", "bool", "list", "str", "json"]

_SUFFIXES: dict[str, FileFormat] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n"}
_JSONL_FIELDS = {"entity", "key", "scope", "op", "state"}


@dataclass(frozen=True)
class RowError:
    line: int
    code: str
    field: str
    reason: str


@dataclass
class ImportReport:
    rows: int = 0
    changes: int = 0
    """Changes written (a row whose state is already the live state writes none)."""
    unchanged: int = 0
    errors: list[RowError] = field(default_factory=list)
    batches: int = 0
    seconds: float = 0.0


class CatalogImportError(TillsyncError):
    """The file as a whole cannot be imported (unreadable, no ``key`` column…)."""

    code = "import_error"


def _kind(annotation: Any) -> Kind:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kind(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _kind(options[0]) if len(options) == 1 else "str"
    if origin is list:
        return "json" if _is_model(typing.get_args(annotation)[0]) else "list"
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if _is_model(annotation):
        return "json"
    return "str"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _kinds(entity: str) -> dict[str, Kind]:
    model = ENTITY_MODELS[entity]
    return {name: _kind(info.annotation) for name, info in model.model_fields.items()}


def _cell(value: str, kind: Kind, column: str) -> Any:
    text = value.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise TillsyncError(
                f"not valid JSON: {exc.msg}", field=f"state.{column}", code="malformed"
            ) from None
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            pass
        code = "float_not_allowed" if text.replace(".", "", 1).lstrip("-").isdigit() else None
        reason = (
            f"{text!r} is not an integer: money is in minor units (12.50 is 1250), "
            "quantities in thousandths"
        )
        raise TillsyncError(reason, field=f"state.{column}", code=code or "wrong_type")
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise TillsyncError(
            f"{text!r} is not a boolean (true/false, 1/0, yes/no)",
            field=f"state.{column}",
            code="wrong_type",
        )
    if kind == "list":
        return [part.strip() for part in text.split(";") if part.strip()]
    return value


def _csv_rows(
    path: Path, entity: str | None, scope: str
) -> Iterator[tuple[int, Edit | TillsyncError]]:
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        if "key" not in columns:
            raise CatalogImportError("the CSV header has no 'key' column", field="key")
        if entity is None and "entity" not in columns:
            raise CatalogImportError(
                "name the entity with --entity or an 'entity' column", field="entity"
            )
        for row in reader:
            yield reader.line_num, _csv_edit(row, entity, scope)


def _csv_edit(row: dict[str | Any, Any], entity: str | None, scope: str) -> Edit | TillsyncError:
    try:
        if None in row:
            raise TillsyncError("more cells than header columns", field="", code="malformed")
        row_entity = row.get("entity") or entity or ""
        if row_entity not in ENTITY_MODELS:
            return prepare_edit(scope, row_entity, row.get("key") or "")  # raises
        kinds = _kinds(row_entity)
        state: dict[str, Any] = {}
        for column, value in row.items():
            if column in ("entity", "key", "scope") or value is None or value.strip() == "":
                continue
            state[column] = _cell(value, kinds.get(column, "str"), column)
        return prepare_edit(
            row.get("scope") or scope, row_entity, row.get("key") or "", state=state
        )
    except TillsyncError as exc:
        return exc


def _jsonl_rows(
    path: Path, entity: str | None, scope: str
) -> Iterator[tuple[int, Edit | TillsyncError]]:
    with path.open(encoding="utf-8-sig") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                yield number, _jsonl_edit(line, entity, scope)


def _jsonl_edit(line: str, entity: str | None, scope: str) -> Edit | TillsyncError:
    try:
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TillsyncError(f"not JSON: {exc.msg}", code="malformed") from None
        if not isinstance(raw, dict):
            raise TillsyncError("a line is one JSON object", code="malformed")
        unknown = sorted(set(raw) - _JSONL_FIELDS)
        if unknown:
            raise TillsyncError(
                f"a line has entity, key, scope, op and state, not {unknown[0]!r}",
                field=unknown[0],
                code="unknown_field",
            )
        op = raw.get("op", "upsert")
        return prepare_edit(
            raw.get("scope", scope),
            raw.get("entity", entity),
            raw.get("key"),
            op,
            raw.get("state"),
        )
    except TillsyncError as exc:
        return exc


def detect_format(path: Path) -> FileFormat:
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise CatalogImportError(
            f"{path.name}: name the format with --format, or use .csv, .jsonl or .ndjson",
            field="format",
        )
    return found


def count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


async def _known_scopes(pool: asyncpg.Pool) -> set[str]:
    async with pool.acquire() as conn:
        return {r["scope"] for r in await conn.fetch("SELECT scope FROM catalog_scopes")}


async def import_file(
    pool: asyncpg.Pool,
    path: Path,
    *,
    scope: str = GLOBAL_SCOPE,
    entity: str | None = None,
    file_format: FileFormat | None = None,
    batch_size: int = 1000,
    changed_by: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import ``path``; the report lists every bad row. ``on_progress(rows)`` is called
    after each batch with the rows read so far."""
    started = time.monotonic()
    file_format = file_format or detect_format(path)
    reader = _csv_rows if file_format == "csv" else _jsonl_rows
    editor = CatalogEditor(pool, changed_by=changed_by or f"import:{path.name}")
    scopes = await _known_scopes(pool)
    report = ImportReport()
    batch: list[tuple[int, Edit]] = []
    try:
        for line, outcome in reader(path, entity, scope):
            report.rows += 1
            if isinstance(outcome, TillsyncError):
                report.errors.append(RowError(line, outcome.code, outcome.field, outcome.reason))
                continue
            if outcome.scope not in scopes:
                report.errors.append(
                    RowError(line, "unknown_scope", "scope", f"no catalog scope {outcome.scope!r}")
                )
                continue
            if outcome.entity == "centers":
                scopes.add(outcome.key)  # its scope exists once this row is applied
            batch.append((line, outcome))
            if len(batch) >= batch_size:
                await _apply(editor, batch, report)
                batch = []
                if on_progress is not None:
                    on_progress(report.rows)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CatalogImportError(f"cannot read {path}: {exc}", field="file") from exc
    if batch:
        await _apply(editor, batch, report)
    if on_progress is not None:
        on_progress(report.rows)
    report.errors.sort(key=lambda error: error.line)
    report.seconds = time.monotonic() - started
    return report


async def _apply(
    editor: CatalogEditor, batch: list[tuple[int, Edit]], report: ImportReport
) -> None:
    try:
        changes = await editor.apply([edit for _, edit in batch])
    except (TillsyncError, asyncpg.PostgresError) as exc:
        if is_transient(exc):
            raise
        if len(batch) > 1:
            for single in batch:
                await _apply(editor, [single], report)
            return
        error = (
            exc
            if isinstance(exc, TillsyncError)
            else TillsyncError(f"PostgreSQL refused the row: {exc}", code="store_failed")
        )
        report.errors.append(RowError(batch[0][0], error.code, error.field, error.reason))
        return
    report.batches += 1
    report.changes += len(changes)
    report.unchanged += len(batch) - len(changes)
