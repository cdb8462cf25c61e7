"""``tillsync-central run`` (the central workers) and ``api`` (the admin API alone)."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer

from ._common import ConfigOption, _reported_errors, _settings, app

# Long-running commands (`run`: ingest, relay, RPC, presence, admin API) are added here,
# each as `@app.command()` wrapping its body in `_reported_errors()` and `_settings()`.


@app.command("run")
def run_command(
    config: ConfigOption = None,
    workers: Annotated[
        int,
        typer.Option("--workers", "-w", min=1, max=256, help="Ingest consumers in this process."),
    ] = 1,
    rpc_workers: Annotated[
        int,
        typer.Option("--rpc-workers", min=1, max=64, help="Catalog RPC consumers in this process."),
    ] = 1,
) -> None:
    """Migrate, declare the topology, then ingest documents, relay catalog changes and
    answer delta requests until SIGTERM or SIGINT."""
    from ..process import tune_gc
    from ..runner import run
    from ..systemd import Notifier

    with _reported_errors():
        settings = _settings(config)
        tune_gc()
        # Under systemd (Type=notify): READY=1, watchdog pings, STOPPING=1; else no-ops.
        notifier = Notifier.from_environment(os.environ, os.getpid())
        asyncio.run(run(settings, workers=workers, rpc_workers=rpc_workers, notifier=notifier))


@app.command("api")
def api_command(
    config: ConfigOption = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Listen here (default: admin_host).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="Listen here (default: admin_port)."),
    ] = None,
) -> None:
    """Serve the admin API and dashboard alone (no workers) until SIGTERM or SIGINT."""
    from ..admin.serve import serve_api
    from ..process import tune_gc

    with _reported_errors():
        settings = _settings(config)
        tune_gc()
        overrides = {k: v for k, v in (("admin_host", host), ("admin_port", port)) if v is not None}
        if overrides:
            settings = settings.model_copy(update=overrides)
        asyncio.run(serve_api(settings))
