"""The local HTTP API for POS apps in any language: a Starlette app served by uvicorn inside
the agent's task group, on 127.0.0.1 only, behind a bearer token.

Every endpoint is described in :mod:`openapi` (served at ``GET /v1/openapi.json``) and in
``docs/pos-integration.md``. Errors are ``{"error": {"code", "field", "reason"}}`` with the
codes of ``docs/errors.md``. The agent owns SIGTERM: uvicorn's signal handling is off, and
the server stops (after its open requests, the event streams ended) when the agent stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Generator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import aiosqlite
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tillsync_protocol import (
    ConfigError,
    InvalidValueError,
    MissingFieldError,
    OutOfRangeError,
    ProtocolError,
    TillsyncError,
    WrongTypeError,
)

from .api_input import document_of, entities_of, entity_of, int_param, read_json
from .catalog_events import CatalogEvent
from .catalog_reader import CatalogEntry
from .event_stream import KEEPALIVE_S, EventQueue, event_stream
from .history import SyncRun, read_runs_async
from .openapi import OPENAPI
from .replica import UnknownItemError
from .store import open_readonly_async

if TYPE_CHECKING:
    from .service import Agent

__all__ = ["LocalApi", "error_response"]

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
MAX_BATCH = 1000
"""Documents in one ``POST /v1/documents`` array."""
SHUTDOWN_TIMEOUT_S = 5
OPEN_PATHS = frozenset({"/v1/openapi.json"})
"""Served without the token: the API's description holds no data."""

_STATUS_OF_CODE = {
    "malformed": 400,
    "unauthorized": 401,
    "not_found": 404,
    "unknown_item": 404,
    "no_price": 404,
    "method_not_allowed": 405,
    "sync_busy": 409,
    "too_large": 413,
    "not_connected": 503,
}


def error_response(status: int, code: str, field: str, reason: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "field": field, "reason": reason}}, status)


def _status_of(exc: TillsyncError) -> int:
    if exc.code in _STATUS_OF_CODE:
        return _STATUS_OF_CODE[exc.code]
    return 422 if isinstance(exc, ProtocolError) else 500


class _BearerAuth:
    """Refuses every request (but :data:`OPEN_PATHS`) without ``Authorization: Bearer
    <api_token>``, compared in constant time."""

    def __init__(self, app: ASGIApp, token: bytes) -> None:
        self.app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                given.strip().encode(), self._token
            ):
                response = error_response(
                    401, "unauthorized", "Authorization", "send Authorization: Bearer <api_token>"
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="tillsync-agent"'
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the agent owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class LocalApi:
    """The API of one agent: :meth:`start` binds, :meth:`serve` serves until the agent stops."""

    def __init__(self, agent: Agent, *, keepalive_s: float = KEEPALIVE_S) -> None:
        settings = agent.settings
        if settings.api_token is None:
            raise ConfigError("the local API needs an api_token", field="api_token")
        self._agent = agent
        self._keepalive_s = keepalive_s
        self._socket: socket.socket | None = None
        self._reader: aiosqlite.Connection | None = None
        self._streams: set[EventQueue] = set()
        self.port = settings.api_port
        token = settings.api_token.get_secret_value().encode()
        self.app = Starlette(
            routes=self._routes(),
            middleware=[Middleware(_BearerAuth, token=token)],
            exception_handlers={
                TillsyncError: self._tillsync_error,
                HTTPException: self._http_error,
                Exception: self._internal_error,
            },
        )

    def _routes(self) -> list[Route]:
        return [
            Route("/v1/documents", self.submit, methods=["POST"]),
            Route("/v1/status", self.status, methods=["GET"]),
            Route("/v1/catalog/items", self.find_items, methods=["GET"]),
            Route("/v1/catalog/items/{key}", self.item, methods=["GET"]),
            Route("/v1/catalog/items/{key}/edit", self.edit_item, methods=["POST"]),
            Route("/v1/catalog/prices/{item_key}", self.price, methods=["GET"]),
            Route("/v1/catalog/{entity}", self.entries, methods=["GET"]),
            Route("/v1/catalog/{entity}/{key}", self.entry, methods=["GET"]),
            Route("/v1/sync/catalog", self.sync_catalog, methods=["POST"]),
            Route("/v1/sync/reinit", self.reinit, methods=["POST"]),
            Route("/v1/sync/documents", self.sync_documents, methods=["POST"]),
            Route("/v1/history", self.history, methods=["GET"]),
            Route("/v1/events", self.events, methods=["GET"]),
            Route("/v1/openapi.json", self.openapi, methods=["GET"]),
        ]

    # -- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Bind 127.0.0.1:``api_port`` now, so that a port in use fails the start-up."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"the local API cannot listen on {HOST}:{self.port}: {exc.strerror}",
                field="api_port",
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        self._socket = sock

    async def serve(self, stopping: asyncio.Event) -> None:
        """Serve until ``stopping``; then end the event streams and finish open requests."""
        if self._socket is None:
            self.start()
        assert self._socket is not None
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            http="h11",
            ws="none",
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
        )
        server = _Server(config)
        self._reader = await open_readonly_async(self._agent.settings.database_path)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(server.serve(sockets=[self._socket]))
                log.info("local api listening", host=HOST, port=self.port)
                await stopping.wait()
                for stream in list(self._streams):
                    stream.close()
                server.should_exit = True
        finally:
            await self._reader.close()
            self._reader = None
            self._socket.close()
            self._socket = None

    # -- error handlers -----------------------------------------------------------------

    async def _tillsync_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TillsyncError)
        return error_response(_status_of(exc), exc.code, exc.field, exc.reason)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
        reason = exc.detail if exc.status_code != 404 else f"no endpoint {request.url.path}"
        return error_response(exc.status_code, code, "", str(reason))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("local api request failed", path=request.url.path)
        return error_response(500, "internal", "", f"{type(exc).__name__} (see the agent log)")

    # -- documents and status -----------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        payload = await read_json(request)
        if not isinstance(payload, list):
            submitted = await self._agent.submit(*document_of(payload))
            return JSONResponse(
                {"seq": submitted.seq, "doc_id": submitted.doc_id, "type": submitted.doc_type},
                201,
            )
        if not 1 <= len(payload) <= MAX_BATCH:
            raise OutOfRangeError(f"send 1 to {MAX_BATCH} documents at once", field="")
        # Gathered: the outbox commits those that arrive together in one transaction.
        results = await asyncio.gather(*(self._submit_one(d) for d in payload))
        stored = sum(1 for r in results if "error" not in r)
        body = {"ok": stored == len(results), "stored": stored, "results": results}
        return JSONResponse(body, 201 if stored == len(results) else 200)

    async def _submit_one(self, document: Any) -> dict[str, Any]:
        try:
            submitted = await self._agent.submit(*document_of(document))
        except TillsyncError as exc:
            return {"error": exc.to_dict()}
        return {"seq": submitted.seq, "doc_id": submitted.doc_id, "type": submitted.doc_type}

    async def status(self, request: Request) -> Response:
        return JSONResponse(self._agent.status())

    # -- catalog ------------------------------------------------------------------------

    async def item(self, request: Request) -> Response:
        key = request.path_params["key"]
        entry = await self._agent.replica.item(key)
        if entry is None:
            raise UnknownItemError(f"the catalog has no item {key!r}", field="key")
        return JSONResponse(await self._with_price(entry))

    async def find_items(self, request: Request) -> Response:
        barcode, text = request.query_params.get("barcode"), request.query_params.get("search")
        if (barcode is None) == (text is None):
            raise MissingFieldError("give exactly one of barcode and search", field="barcode")
        found: list[CatalogEntry]
        if barcode is not None:
            entry = await self._agent.replica.item_by_barcode(barcode)
            found = [] if entry is None else [entry]
        else:
            limit = int_param(request, "limit", 20, 1, 1000)
            found = await self._agent.replica.search(text or "", limit)
        return JSONResponse({"items": [await self._with_price(entry) for entry in found]})

    async def price(self, request: Request) -> Response:
        key = request.path_params["item_key"]
        price = await self._agent.replica.price(key)
        if price is not None:
            return JSONResponse(asdict(price))
        if await self._agent.replica.item(key) is None:
            raise UnknownItemError(f"the catalog has no item {key!r}", field="key")
        raise TillsyncError(f"item {key!r} has no valid price", field="key", code="no_price")

    async def entry(self, request: Request) -> Response:
        entity, key = entity_of(request), request.path_params["key"]
        entry = await self._agent.replica.get(entity, key)
        if entry is None:
            raise TillsyncError(
                f"the catalog has no {entity} {key!r}", field="key", code="not_found"
            )
        return JSONResponse(entry.to_dict())

    async def entries(self, request: Request) -> Response:
        entries = await self._agent.replica.all(entity_of(request))
        return JSONResponse({"entries": [entry.to_dict() for entry in entries]})

    async def edit_item(self, request: Request) -> Response:
        payload = await read_json(request)
        changes = payload.get("changes") if isinstance(payload, dict) else None
        if not isinstance(changes, dict) or not changes:
            raise MissingFieldError('an item edit is {"changes": {field: value}}', field="changes")
        submitted = await self._agent.edit_item(request.path_params["key"], changes)
        return JSONResponse(
            {"seq": submitted.seq, "doc_id": submitted.doc_id, "type": submitted.doc_type}, 201
        )

    async def _with_price(self, entry: CatalogEntry) -> dict[str, Any]:
        price = await self._agent.replica.price(entry.key)
        return {**entry.to_dict(), "price": None if price is None else asdict(price)}

    # -- syncs and history --------------------------------------------------------------

    async def sync_catalog(self, request: Request) -> Response:
        options = await read_json(request, empty={})
        report = await self._agent.sync_catalog(entities_of(options))
        return JSONResponse(report.to_dict())

    async def reinit(self, request: Request) -> Response:
        options = await read_json(request, empty={})
        mode = options.get("mode")
        if mode not in ("update", "replace"):
            raise InvalidValueError("mode is update or replace", field="mode")
        with_customers = options.get("with_customers", True)
        if not isinstance(with_customers, bool):
            raise WrongTypeError("with_customers is a boolean", field="with_customers")
        report = await self._agent.reinit_catalog(
            mode, with_customers=with_customers, entities=entities_of(options)
        )
        return JSONResponse(report.to_dict())

    async def sync_documents(self, request: Request) -> Response:
        run = await self._agent.documents_sync.sweep()
        return JSONResponse(run.to_dict())

    async def history(self, request: Request) -> Response:
        limit = int_param(request, "limit", 50, 1, 1000)
        kind = request.query_params.get("kind")
        if kind is not None and kind not in ("documents", "catalog_delta", "reinit"):
            raise InvalidValueError("kind is documents, catalog_delta or reinit", field="kind")
        if self._reader is None:
            raise TillsyncError("the local API is not serving", code="not_running")
        runs = await read_runs_async(self._reader, limit, kind)
        return JSONResponse({"runs": [run.to_dict() for run in runs]})

    # -- events and description ---------------------------------------------------------

    async def events(self, request: Request) -> Response:
        queue = EventQueue(self._agent.settings.catalog_queue_size)

        def on_change(event: CatalogEvent) -> None:
            queue.push("catalog", asdict(event))

        def on_run(run: SyncRun) -> None:
            queue.push("sync", run.to_dict())

        unsubscribe = self._agent.on_change(on_change)
        self._agent.history.on_finish.append(on_run)
        self._streams.add(queue)

        def close() -> None:
            unsubscribe()
            with contextlib.suppress(ValueError):
                self._agent.history.on_finish.remove(on_run)
            self._streams.discard(queue)

        return StreamingResponse(
            event_stream(queue, self._ready_event(), self._keepalive_s, close),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _ready_event(self) -> dict[str, Any]:
        counts = self._agent.outbox.counts
        return {
            "register_id": self._agent.settings.register_id,
            "last_seq": counts.last_seq,
            "pending": counts.pending,
        }

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(OPENAPI)
