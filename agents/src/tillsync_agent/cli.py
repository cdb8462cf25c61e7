"""``tillsync-agent``: run the service, submit documents, show status, sync and read the
catalog."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tillsync_protocol import TillsyncError

from .catalog_cli import register_catalog_commands
from .control_socket import request
from .enroll import register_enroll_commands
from .logs import configure_logging
from .outbox import Outbox
from .process import shorten_switch_interval, tune_gc
from .service import Agent
from .settings import AgentSettings
from .store import Store, open_readonly
from .systemd import Notifier, run_supervised
from .terminal import ConfigOption, console, err_console
from .terminal import fail as _fail
from .terminal import settings_from as _settings

app = typer.Typer(help="tillsync register agent", no_args_is_help=True, add_completion=False)
SUBMIT_CHUNK = 500


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the agent service until SIGTERM or Ctrl-C (in-flight work is drained first)."""
    settings = _settings(config)
    configure_logging(settings.log_format, settings.log_level)
    tune_gc()
    shorten_switch_interval()

    # Under systemd (Type=notify): READY=1, watchdog pings, STOPPING=1; else no-ops.
    notifier = Notifier.from_environment(os.environ, os.getpid())

    async def main() -> None:
        async with Agent(settings) as agent:
            loop = asyncio.get_running_loop()

            def stop() -> None:
                notifier.stopping()
                agent.stop()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop)
            await run_supervised(
                agent.run(), notifier, started=agent.started, healthy=lambda: agent.healthy
            )

    try:
        asyncio.run(main())
    except TillsyncError as exc:
        _fail(exc.to_dict())


def _read_documents(source: Path | None) -> Iterator[tuple[int, Any]]:
    stream = sys.stdin if source is None or str(source) == "-" else source.open(encoding="utf-8")
    for number, line in enumerate(stream, start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                yield number, exc


@app.command()
def submit(
    source: Annotated[
        Path | None,
        typer.Argument(help="JSON lines file ({type, body} per line); - or nothing for stdin"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Store documents in the outbox (through the running service if there is one)."""
    settings = _settings(config)
    lines = list(_read_documents(source))
    try:
        replies = asyncio.run(_submit_all(settings, lines))
    except TillsyncError as exc:
        _fail(exc.to_dict())
        return
    stored = [r for r in replies if r.get("ok")]
    failed = [(n, r) for (n, _), r in zip(lines, replies, strict=True) if not r.get("ok")]
    for number, reply in failed:
        e = reply["error"]
        err_console.print(
            f"line {number}: [red]{e['code']}[/red] {e.get('field') or ''}: {e['reason']}"
        )
    if stored:
        console.print(
            f"stored {len(stored)} document(s), seq {stored[0]['seq']}..{stored[-1]['seq']}"
        )
    else:
        console.print("stored 0 documents")
    if failed:
        raise typer.Exit(1)


async def _submit_all(
    settings: AgentSettings, lines: list[tuple[int, Any]]
) -> list[dict[str, Any]]:
    documents = [
        d if not isinstance(d, Exception) else {"type": None, "body": None, "_error": str(d)}
        for _, d in lines
    ]
    replies: list[dict[str, Any]] = []
    try:
        for start in range(0, len(documents), SUBMIT_CHUNK):
            chunk = documents[start : start + SUBMIT_CHUNK]
            (reply,) = await request(
                settings.socket_path, [{"op": "submit_many", "documents": chunk}]
            )
            replies.extend(reply["results"])
    except (FileNotFoundError, ConnectionRefusedError):
        if replies:
            raise
        # No service running: write the outbox ourselves (the store lock keeps one writer).
        async with Store(settings.database_path) as store:
            outbox = Outbox(store, register_id=settings.register_id, center_id=settings.center_id)
            await outbox.load()
            # Gathered so that the outbox commits them together (group commit).
            replies = list(await asyncio.gather(*(_submit_direct(outbox, d) for d in documents)))
    for (number, raw), reply in zip(lines, replies, strict=True):
        if isinstance(raw, Exception):
            reply.update(
                ok=False,
                error={
                    "code": "malformed",
                    "field": "",
                    "reason": f"line {number} is not JSON: {raw}",
                },
            )
    return replies


async def _submit_direct(outbox: Outbox, document: Any) -> dict[str, Any]:
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("type"), str)
        or not isinstance(document.get("body"), dict)
    ):
        return {
            "ok": False,
            "error": {
                "code": "malformed",
                "field": "",
                "reason": 'each line is {"type": str, "body": {...}}',
            },
        }
    try:
        submitted = await outbox.submit(document["type"], document["body"])
    except TillsyncError as exc:
        return {"ok": False, "error": exc.to_dict()}
    return {"ok": True, "seq": submitted.seq, "doc_id": submitted.doc_id}


def _offline_status(settings: AgentSettings) -> dict[str, Any]:
    with open_readonly(settings.database_path) as db:
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        state = dict(db.execute("SELECT key, value FROM agent_state").fetchall())
    return {
        "register_id": settings.register_id,
        "center_id": settings.center_id,
        "running": False,
        "connected": False,
        "pending": counters["pending"],
        "rejected": counters["rejected"],
        "acknowledged": counters["acknowledged"],
        "last_seq": counters["last_seq"],
        "last_successful_send_at": state.get("last_successful_send_at"),
        "last_error": state.get("last_error"),
    }


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Register, center, pending / rejected / acknowledged counts, link state."""
    settings = _settings(config)
    info: dict[str, Any]
    try:
        (info,) = asyncio.run(request(settings.socket_path, [{"op": "status"}], timeout=5))
        info.pop("ok", None)
    except (TimeoutError, OSError):
        try:
            info = _offline_status(settings)
        except TillsyncError as exc:
            _fail(exc.to_dict())
            return
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(show_header=False, box=None)
    for key in (
        "register_id",
        "center_id",
        "running",
        "connected",
        "pending",
        "rejected",
        "acknowledged",
        "last_seq",
        "last_successful_send_at",
        "last_error",
    ):
        table.add_row(key.replace("_", " "), str(info.get(key)))
    console.print(table)


register_catalog_commands(app)
register_enroll_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
