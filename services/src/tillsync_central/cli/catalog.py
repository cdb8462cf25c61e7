"""``tillsync-central catalog``: import files, set or delete rows; and ``reinit``, which
tells registers to reload theirs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tillsync_protocol import TillsyncError

from ..db import create_pool
from ..settings import CentralSettings
from ._common import ConfigOption, _err, _log, _out, _reported_errors, _settings, app

if TYPE_CHECKING:
    from ..catalog import Change
    from ..catalog_import import ImportReport
    from ..commands import ReinitOrder


catalog_app = typer.Typer(
    help="Edit the catalog: import files, set or delete rows.", no_args_is_help=True
)
app.add_typer(catalog_app, name="catalog")

ScopeOption = Annotated[str, typer.Option("--scope", "-s", help="'global' or a center id.")]
MAX_ERRORS_SHOWN = 50


async def _import(
    settings: CentralSettings,
    file: Path,
    scope: str,
    entity: str | None,
    file_format: str | None,
    batch_size: int,
) -> ImportReport:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from ..catalog_import import count_lines, detect_format, import_file

    fmt = detect_format(file) if file_format is None else file_format
    total = max(count_lines(file) - (1 if fmt == "csv" else 0), 0)
    pool = await create_pool(settings)
    try:
        with Progress(
            TextColumn("[bold]importing[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_err,
        ) as progress:
            task = progress.add_task(file.name, total=total)
            return await import_file(
                pool,
                file,
                scope=scope,
                entity=entity,
                file_format=fmt,  # type: ignore[arg-type]
                batch_size=batch_size,
                on_progress=lambda rows: progress.update(task, completed=rows),
            )
    finally:
        await pool.close()


@catalog_app.command("import")
def catalog_import(
    file: Annotated[Path, typer.Argument(help="CSV with a header, or JSON lines.", dir_okay=False)],
    scope: ScopeOption = "global",
    entity: Annotated[
        str | None,
        typer.Option(
            "--entity", "-e", help="The entity of every row (CSV without an 'entity' column)."
        ),
    ] = None,
    file_format: Annotated[
        str | None,
        typer.Option("--format", help="csv or jsonl (default: from the file's suffix)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=10_000, help="Rows per transaction.")
    ] = 1000,
    config: ConfigOption = None,
) -> None:
    """Import catalog rows; bad rows are reported (line, code, field, reason) and the good
    ones applied. Exit status 1 if any row was bad."""
    with _reported_errors():
        settings = _settings(config)
        if file_format not in (None, "csv", "jsonl"):
            raise TillsyncError("--format is csv or jsonl", field="format", code="invalid_value")
        report = asyncio.run(_import(settings, file, scope, entity, file_format, batch_size))
        _log.info(
            "catalog imported",
            file=str(file),
            rows=report.rows,
            changes=report.changes,
            unchanged=report.unchanged,
            bad=len(report.errors),
            seconds=round(report.seconds, 2),
        )
        if report.errors:
            table = Table("line", "code", "field", "reason", title="rows not imported")
            for error in report.errors[:MAX_ERRORS_SHOWN]:
                table.add_row(str(error.line), error.code, error.field or "-", error.reason)
            _err.print(table)
            if len(report.errors) > MAX_ERRORS_SHOWN:
                _err.print(f"... and {len(report.errors) - MAX_ERRORS_SHOWN} more bad rows")
        good = report.rows - len(report.errors)
        _out.print(
            f"{report.rows} rows read: {good} good ({report.changes} changed, "
            f"{report.unchanged} unchanged), {len(report.errors)} bad, "
            f"in {report.seconds:.1f} s"
        )
        if report.errors:
            raise typer.Exit(1)


async def _edit(
    settings: CentralSettings, scope: str, entity: str, key: str, state: object | None
) -> Change | None:
    from ..catalog import CatalogEditor

    pool = await create_pool(settings)
    try:
        editor = CatalogEditor(pool, changed_by="tillsync-central cli")
        if state is None:
            return await editor.delete(scope, entity, key)
        return await editor.upsert(scope, entity, key, state)
    finally:
        await pool.close()


def _print_change(change: Change) -> None:
    _out.print(
        f"{change.op} {change.entity} {change.key} in {change.scope}: "
        f"scope_seq {change.scope_seq}, version {change.version}",
        highlight=False,
    )


@catalog_app.command("set")
def catalog_set(
    entity: Annotated[str, typer.Argument(help="The entity (items, prices, …).")],
    key: Annotated[str, typer.Argument(help="The row's key.")],
    state: Annotated[str, typer.Argument(help="The whole state as JSON: '{\"name\": …}'.")],
    scope: ScopeOption = "global",
    config: ConfigOption = None,
) -> None:
    """Create or replace one catalog row."""
    with _reported_errors():
        settings = _settings(config)
        try:
            parsed = json.loads(state)
        except json.JSONDecodeError as exc:
            raise TillsyncError(f"not JSON: {exc.msg}", field="state", code="malformed") from None
        change = asyncio.run(_edit(settings, scope, entity, key, parsed))
        assert change is not None
        _print_change(change)


@catalog_app.command("delete")
def catalog_delete(
    entity: Annotated[str, typer.Argument(help="The entity (items, prices, …).")],
    key: Annotated[str, typer.Argument(help="The row's key.")],
    scope: ScopeOption = "global",
    config: ConfigOption = None,
) -> None:
    """Delete one catalog row (registers are told to delete it too)."""
    with _reported_errors():
        settings = _settings(config)
        change = asyncio.run(_edit(settings, scope, entity, key, None))
        if change is None:
            _out.print(f"nothing to delete: no live {entity} {key} in {scope}", highlight=False)
        else:
            _print_change(change)


async def _reinit(
    settings: CentralSettings,
    register: str | None,
    center: str | None,
    order: ReinitOrder,
) -> list[str]:
    from ..commands import registers_for, send_reinit

    pool = await create_pool(settings)
    try:
        targets = await registers_for(pool, register_id=register, center_id=center)
    finally:
        await pool.close()
    if targets:
        await send_reinit(settings, targets, order)
    return targets


@app.command("reinit")
def reinit_command(
    mode: Annotated[
        str, typer.Option("--mode", help="update (upsert everything) or replace (swap).")
    ],
    register: Annotated[str | None, typer.Option("--register", help="One register.")] = None,
    center: Annotated[
        str | None, typer.Option("--center", help="Every active register of a center.")
    ] = None,
    with_customers: Annotated[
        bool,
        typer.Option("--with-customers/--without-customers", help="Include customers."),
    ] = True,
    entities: Annotated[
        str | None, typer.Option("--entities", help="Comma-separated entities (default: all).")
    ] = None,
    requested_by: Annotated[
        str, typer.Option("--requested-by", help="Who asks (shown on the register).")
    ] = "tillsync-central",
    config: ConfigOption = None,
) -> None:
    """Tell registers to reload their catalog (a `reinit` command in their queue)."""
    from ..commands import ReinitOrder

    with _reported_errors():
        settings = _settings(config)
        if (register is None) == (center is None):
            raise TillsyncError(
                "name exactly one of --register and --center",
                field="register",
                code="invalid_value",
            )
        if mode not in ("update", "replace"):
            raise TillsyncError("--mode is update or replace", field="mode", code="invalid_value")
        order = ReinitOrder(
            mode="update" if mode == "update" else "replace",
            with_customers=with_customers,
            entities=None
            if entities is None
            else [e.strip() for e in entities.split(",") if e.strip()],
            requested_by=requested_by,
        )
        targets = asyncio.run(_reinit(settings, register, center, order))
        _log.info("reinit sent", registers=targets, mode=mode, with_customers=with_customers)
        if not targets:
            _out.print(f"no active register in center {center}", highlight=False)
        for target in targets:
            _out.print(f"reinit ({mode}) sent to {target}", highlight=False)
