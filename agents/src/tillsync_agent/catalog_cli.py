"""The catalog commands of ``tillsync-agent``: ``sync``, ``reinit``, ``history`` and
``catalog item`` / ``catalog search``.

``sync`` and ``reinit`` ask the running service over its local socket and show its
progress; ``history`` and ``catalog`` read the database read-only, service or not.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tillsync_protocol import TillsyncError

from .catalog_reader import CatalogEntry, CatalogReader, Price
from .control_socket import request_stream
from .history import read_runs
from .settings import AgentSettings
from .store import open_readonly
from .terminal import ConfigOption, console
from .terminal import fail as _fail
from .terminal import settings_from as _settings

__all__ = ["catalog_app", "register_catalog_commands"]

catalog_app = typer.Typer(help="read the catalog replica (read-only)", no_args_is_help=True)

EntitiesOption = Annotated[
    str | None,
    typer.Option("--entities", help="comma-separated catalog entities, e.g. items,prices"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def register_catalog_commands(app: typer.Typer) -> None:
    app.command()(sync)
    app.command()(reinit)
    app.command()(history)
    app.add_typer(catalog_app, name="catalog")


def _split(entities: str | None) -> list[str] | None:
    if entities is None:
        return None
    return [e.strip() for e in entities.split(",") if e.strip()]


def sync(
    catalog: Annotated[
        bool, typer.Option("--catalog", help="ask central for catalog changes (a delta)")
    ] = False,
    entities: EntitiesOption = None,
    config: ConfigOption = None,
) -> None:
    """Sync now through the running service: ``--catalog`` asks central for what changed
    since the cursors (with ``--entities``, only those: changes are applied, cursors stay)."""
    if not catalog:
        _fail({"code": "missing_field", "field": "--catalog", "reason": "say what to sync"})
    settings = _settings(config)
    _run_sync(settings, {"op": "sync", "entities": _split(entities)})


def reinit(
    mode: Annotated[str, typer.Option("--mode", help="update (upsert all) or replace (swap)")],
    with_customers: Annotated[
        bool,
        typer.Option("--with-customers/--without-customers", help="include customers"),
    ] = True,
    entities: EntitiesOption = None,
    config: ConfigOption = None,
) -> None:
    """Reload the catalog from a snapshot through the running service. ``replace`` loads
    into shadow tables and swaps them in one transaction: a reinit cut off midway leaves
    the old catalog usable, and running it again completes it."""
    if mode not in ("update", "replace"):
        _fail({"code": "invalid_value", "field": "--mode", "reason": "update or replace"})
    settings = _settings(config)
    _run_sync(
        settings,
        {
            "op": "reinit",
            "mode": mode,
            "with_customers": with_customers,
            "entities": _split(entities),
        },
    )


def _run_sync(settings: AgentSettings, message: dict[str, Any]) -> None:
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("pages {task.fields[pages]} · received {task.fields[received]}"),
        TextColumn("· applied {task.fields[applied]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("requesting", total=None, pages=0, received=0, applied=0)

        def show(update: dict[str, Any]) -> None:
            progress.update(
                task,
                description=str(update.get("phase", "")),
                pages=update.get("pages", 0),
                received=update.get("received", 0),
                applied=update.get("applied", 0),
            )

        try:
            reply = asyncio.run(request_stream(settings.socket_path, message, show))
        except (FileNotFoundError, ConnectionRefusedError):
            _fail(
                {
                    "code": "not_running",
                    "field": "",
                    "reason": "the agent service is not running (tillsync-agent run); "
                    "a sync needs it",
                }
            )
            return
        except ConnectionError:
            # The service died (or was stopped) before answering: not a crash of ours.
            _fail(
                {
                    "code": "not_running",
                    "field": "",
                    "reason": "the agent service stopped before the sync finished; the "
                    "catalog is either fully updated or as it was (tillsync-agent history "
                    "shows which): start the service and run the command again",
                }
            )
            return
    report = reply.get("report")
    if not isinstance(report, dict):
        _fail(reply.get("error") or {"code": "error", "reason": f"unexpected reply {reply}"})
        return
    _print_report(report)
    if report.get("result") == "failed":
        raise typer.Exit(1)


def _print_report(report: dict[str, Any]) -> None:
    if report.get("nothing_new"):
        console.print("[green]nothing new[/green]: the catalog was already up to date")
    table = Table(show_header=False, box=None)
    colour = {"successful": "green", "partially_successful": "yellow"}.get(
        str(report["result"]), "red"
    )
    table.add_row("result", f"[{colour}]{report['result']}[/{colour}]")
    for key in ("kind", "mode", "pages", "received", "applied"):
        table.add_row(key, str(report.get(key)))
    cursors = report.get("cursors") or {}
    table.add_row("cursors", ", ".join(f"{s}={n}" for s, n in sorted(cursors.items())) or "-")
    table.add_row("duration", f"{int(report.get('duration_ms', 0)) / 1000:.2f} s")
    for error in report.get("errors") or []:
        table.add_row("error", f"[red]{error}[/red]")
    console.print(table)


def history(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 20,
    kind: Annotated[
        str | None,
        typer.Option("--kind", help="only documents, catalog_delta or reinit runs"),
    ] = None,
) -> None:
    """The latest syncs (documents sweeps, catalog deltas and reinits), newest first, with
    their results: successful, partially_successful or failed, and the error log."""
    if kind not in (None, "documents", "catalog_delta", "reinit"):
        _fail(
            {
                "code": "invalid_value",
                "field": "--kind",
                "reason": "documents, catalog_delta or reinit",
            }
        )
    settings = _settings(config)
    try:
        with open_readonly(settings.database_path) as db:
            runs = read_runs(db, limit, kind)
    except TillsyncError as exc:
        _fail(exc.to_dict())
        return
    if as_json:
        console.print_json(json.dumps([run.to_dict() for run in runs]))
        return
    table = Table("id", "kind", "started", "duration", "result", "sent", "received", "errors")
    for run in runs:
        duration = (
            "" if run.finished_at is None else f"{(run.finished_at - run.started_at) / 1000:.2f} s"
        )
        table.add_row(
            str(run.id),
            run.kind,
            _time(run.started_at),
            duration,
            run.result or "running",
            str(run.sent),
            str(run.received),
            "; ".join(run.errors),
        )
    console.print(table)


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


async def _read(settings: AgentSettings, work: Any) -> Any:
    reader = CatalogReader(settings.database_path, settings.center_id)
    await reader.open()
    try:
        return await work(reader)
    finally:
        await reader.close()


@catalog_app.command("item")
def catalog_item(
    code: Annotated[str | None, typer.Argument(help="the item's key")] = None,
    barcode: Annotated[str | None, typer.Option("--barcode", help="find it by barcode")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """One item: its state, price here, version and whether a local edit is pending."""
    if (code is None) == (barcode is None):
        _fail({"code": "missing_field", "field": "CODE", "reason": "give CODE or --barcode"})
    settings = _settings(config)

    async def find(reader: CatalogReader) -> tuple[CatalogEntry | None, Price | None]:
        entry = await (reader.item_by_barcode(barcode) if barcode else reader.item(str(code)))
        return entry, None if entry is None else await reader.price(entry.key)

    try:
        entry, price = asyncio.run(_read(settings, find))
    except TillsyncError as exc:
        _fail(exc.to_dict())
        return
    if entry is None:
        console.print(f"no item {barcode or code!r} in the catalog")
        raise typer.Exit(1)
    if as_json:
        data = entry.to_dict()
        data["price"] = None if price is None else price.__dict__
        console.print_json(json.dumps(data))
        return
    table = Table(show_header=False, box=None)
    table.add_row("key", entry.key)
    table.add_row("scope", entry.scope)
    table.add_row("version", str(entry.version))
    table.add_row("local edit", "yes (awaiting central)" if entry.local_edit else "no")
    if price is not None:
        table.add_row("price here", f"{price.gross_price} {price.currency} ({price.source})")
    for key, value in entry.state.items():
        table.add_row(key, json.dumps(value, ensure_ascii=False))
    console.print(table)


@catalog_app.command("search")
def catalog_search(
    text: Annotated[str, typer.Argument(help="part of a name, a key or a barcode")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Items whose name contains TEXT (any case), or whose key or barcode is TEXT."""
    settings = _settings(config)

    async def search(reader: CatalogReader) -> list[CatalogEntry]:
        return await reader.search(text, limit)

    try:
        found: list[CatalogEntry] = asyncio.run(_read(settings, search))
    except TillsyncError as exc:
        _fail(exc.to_dict())
        return
    if as_json:
        console.print_json(json.dumps([e.to_dict() for e in found]))
        return
    table = Table("key", "name", "price", "barcodes", "local edit")
    for entry in found:
        state = entry.state
        table.add_row(
            entry.key,
            str(state.get("name", "")),
            f"{state.get('gross_price', '')} {state.get('currency', '')}",
            ", ".join(str(b) for b in state.get("barcodes") or []),  # type: ignore[union-attr]
            "yes" if entry.local_edit else "",
        )
    console.print(table)
    if not found:
        raise typer.Exit(1)
