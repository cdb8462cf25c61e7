"""The admin app (Starlette) and its server (uvicorn), run alone by ``tillsync-central api``
or beside the workers by ``tillsync-central run``.

:class:`AdminServer` owns its lifetime like the agent's local API: :meth:`start` binds the
port (so a port in use fails at once), :meth:`serve` runs uvicorn, the queue monitor and
the live feed in one task group until ``stopping`` is set; signals belong to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from tillsync_protocol import ConfigError, TillsyncError

from ..db.pool import init_connection
from ..http_server import embedded_server, listen
from ..metrics import build_registry, metrics_app
from ..settings import CentralSettings
from .auth import api_route
from .context import AdminContext
from .endpoints import ENDPOINTS
from .errors import error_response, status_of
from .pages import page_routes

if TYPE_CHECKING:
    from ..runner import CentralService

__all__ = ["AdminServer", "create_app", "serving_admin"]

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
SHUTDOWN_TIMEOUT_S = 5


def create_app(ctx: AdminContext, service: CentralService | None = None) -> Starlette:
    """The ASGI app: the JSON API, the pages, the static files and ``/metrics`` (the fleet
    gauges, and ``service``'s counters when it runs in this process)."""

    async def tillsync_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TillsyncError)
        return error_response(status_of(exc), exc.code, exc.field, exc.reason)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        reason = f"no endpoint {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, "", reason)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("admin request failed", path=request.url.path)
        return error_response(500, "internal", "", f"{type(exc).__name__} (see central's log)")

    routes: list[BaseRoute] = [
        *(api_route(ctx, endpoint) for endpoint in ENDPOINTS),
        *page_routes(ctx),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
        Route(
            "/metrics", _Asgi(metrics_app(build_registry(ctx.pool, ctx.settings, service=service)))
        ),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            TillsyncError: tillsync_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    app.state.ctx = ctx
    return app


class _Asgi:
    """An ASGI app as a route's endpoint (Starlette treats plain functions as handlers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class AdminServer:
    """The admin API and dashboard over one pool."""

    def __init__(
        self,
        settings: CentralSettings,
        pool: asyncpg.Pool,
        service: CentralService | None = None,
    ) -> None:
        self.settings = settings
        self.ctx = AdminContext.build(settings, pool)
        self.app = create_app(self.ctx, service)
        self.host = settings.admin_host
        self.port = settings.admin_port
        self._socket: socket.socket | None = None
        self.serving = asyncio.Event()

    def start(self) -> None:
        """Bind now, so that a port in use fails the start-up (``ConfigError``)."""
        self._socket = listen(self.host, self.port, setting="admin_port", what="the admin API")
        self.port = self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def serve(self, stopping: asyncio.Event) -> None:
        """Serve until ``stopping``; then end the event streams and finish open requests."""
        if self._socket is None:
            self.start()
        assert self._socket is not None
        server = embedded_server(self.app, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(server.serve(sockets=[self._socket]))
                group.create_task(self.ctx.feed.run(stopping))
                group.create_task(self.ctx.monitor.run(stopping))
                log.info("admin api listening", url=self.url)
                self.serving.set()
                await stopping.wait()
                for subscriber in list(self.ctx.feed.subscribers):
                    subscriber.close()
                server.should_exit = True
        finally:
            self._socket.close()
            self._socket = None


ADMIN_POOL_SIZE = 4
POOL_CLOSE_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def serving_admin(
    settings: CentralSettings, service: CentralService | None = None
) -> AsyncIterator[AdminServer | None]:
    """Serve the admin API beside ``tillsync-central run``'s workers while the block runs,
    over a small pool of its own (dashboard users never take the workers' connections).

    Yields None (and serves nothing) when ``admin_in_run`` is off, or when the port is
    taken: that is logged as an error, never fatal, because the workers matter more than
    the dashboard (``tillsync-central api`` fails on it instead).
    """
    if not settings.admin_in_run:
        yield None
        return
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=0,
        max_size=ADMIN_POOL_SIZE,
        timeout=settings.db_connect_timeout,
        command_timeout=settings.db_command_timeout,
        init=init_connection,
    )
    assert pool is not None  # asyncpg types the result as optional
    try:
        server = AdminServer(settings, pool, service)
        try:
            server.start()
        except ConfigError as exc:
            log.error("admin api not served", code=exc.code, field=exc.field, reason=exc.reason)
            yield None
            return
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(server.serve(stopping), name="admin-api")
            try:
                yield server
            finally:
                stopping.set()
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout=POOL_CLOSE_TIMEOUT_S)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()
