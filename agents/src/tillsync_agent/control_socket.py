"""The agent's local socket: other processes on the till (``tillsync-agent submit``,
``status``) talk to the running service through it, so there is only ever one writer.

Protocol: one JSON object per line in, one JSON object per line out.
``{"op": "submit", "type": "receipt", "body": {...}}`` → ``{"ok": true, "seq": 7, "doc_id": "…"}``
or ``{"ok": false, "error": {"code", "field", "reason"}}``; ``{"op": "status"}`` → the status.
Catalog ops (docs/agent.md): ``catalog_item``, ``catalog_search``, ``catalog_get``,
``catalog_all``, ``edit_item``, and ``sync`` / ``reinit``, which answer with progress lines
``{"progress": {...}}`` before their final reply. The socket file is created with mode 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from tillsync_protocol import TillsyncError

from .catalog_sync import SyncProgress, SyncReport

if TYPE_CHECKING:
    from .service import Agent

__all__ = ["ControlSocket", "request", "request_stream"]

log = structlog.get_logger(__name__)

MAX_LINE = 2 * 1024 * 1024


class ControlSocket:
    def __init__(self, path: Path, agent: Agent) -> None:
        self._path = path
        self._agent = agent
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=self._path, limit=MAX_LINE)
        os.chmod(self._path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():

                def emit(progress: SyncProgress) -> None:
                    writer.write(json.dumps({"progress": asdict(progress)}).encode() + b"\n")

                reply = await self._handle(line, emit)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.debug("control socket client gone", error=str(exc))
        finally:
            writer.close()

    async def _handle(self, line: bytes, emit: Callable[[SyncProgress], None]) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return _error("malformed", "", f"not JSON: {exc}")
        if not isinstance(request, dict):
            return _error("malformed", "", "a request is a JSON object")
        op = request.get("op", "submit")
        if op == "status":
            return {"ok": True, **self._agent.status()}
        if op == "submit_many":
            documents = request.get("documents")
            if not isinstance(documents, list):
                return _error("missing_field", "documents", "submit_many needs a list of documents")
            # Submitted together, committed together (the outbox's group commit).
            replies = await asyncio.gather(*(self._submit(d) for d in documents))
            return {"ok": all(r["ok"] for r in replies), "results": replies}
        if op in _CATALOG_OPS:
            try:
                return await self._catalog(op, request, emit)
            except TillsyncError as exc:
                return {"ok": False, "error": exc.to_dict()}
        if op != "submit":
            return _error("invalid_value", "op", f"unknown op {op!r}")
        return await self._submit(request)

    async def _catalog(
        self, op: str, request: dict[str, Any], emit: Callable[[SyncProgress], None]
    ) -> dict[str, Any]:
        agent, replica = self._agent, self._agent.replica
        if op == "catalog_item":
            barcode = request.get("barcode")
            if isinstance(barcode, str):
                entry = await replica.item_by_barcode(barcode)
            else:
                entry = await replica.item(_text(request, "key"))
            price = None if entry is None else await replica.price(entry.key)
            return {
                "ok": True,
                "item": None if entry is None else entry.to_dict(),
                "price": None if price is None else asdict(price),
            }
        if op == "catalog_search":
            limit = request.get("limit", 20)
            if not isinstance(limit, int) or not 1 <= limit <= 1000:
                return _error("invalid_value", "limit", "limit is an integer from 1 to 1000")
            found = await replica.search(_text(request, "text"), limit)
            return {"ok": True, "items": [e.to_dict() for e in found]}
        if op == "catalog_get":
            entry = await replica.get(_text(request, "entity"), _text(request, "key"))
            return {"ok": True, "entry": None if entry is None else entry.to_dict()}
        if op == "catalog_all":
            entries = await replica.all(_text(request, "entity"))
            return {"ok": True, "entries": [e.to_dict() for e in entries]}
        if op == "edit_item":
            changes = request.get("changes")
            if not isinstance(changes, dict):
                return _error("missing_field", "changes", "edit_item needs changes (an object)")
            submitted = await agent.edit_item(_text(request, "item_id"), changes)
            return {"ok": True, "seq": submitted.seq, "doc_id": submitted.doc_id}
        entities = _entities(request)
        report: SyncReport
        if op == "sync":
            report = await agent.sync_catalog(entities, emit)
        else:
            with_customers = request.get("with_customers", True)
            if not isinstance(with_customers, bool):
                return _error("wrong_type", "with_customers", "with_customers is a boolean")
            report = await agent.reinit_catalog(
                _text(request, "mode"),
                with_customers=with_customers,
                entities=entities,
                progress=emit,
            )
        return {"ok": report.result != "failed", "report": report.to_dict()}

    async def _submit(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return _error("malformed", "", "a document is a JSON object with type and body")
        doc_type, body = request.get("type"), request.get("body")
        if not isinstance(doc_type, str):
            return _error("missing_field", "type", "a document needs its type")
        if not isinstance(body, dict):
            return _error("missing_field", "body", "a document needs its body (an object)")
        try:
            submitted = await self._agent.submit(doc_type, body)
        except TillsyncError as exc:
            return {"ok": False, "error": exc.to_dict()}
        return {"ok": True, "seq": submitted.seq, "doc_id": submitted.doc_id, "type": doc_type}


_CATALOG_OPS = frozenset(
    {"catalog_item", "catalog_search", "catalog_get", "catalog_all", "edit_item", "sync", "reinit"}
)


def _text(request: dict[str, Any], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise TillsyncError(f"{name} is a non-empty string", field=name, code="missing_field")
    return value


def _entities(request: dict[str, Any]) -> list[str] | None:
    entities = request.get("entities")
    if entities is None:
        return None
    if not isinstance(entities, list) or not all(isinstance(e, str) for e in entities):
        raise TillsyncError(
            "entities is a list of entity names", field="entities", code="wrong_type"
        )
    return entities


def _error(code: str, field: str, reason: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "field": field, "reason": reason}}


async def request(
    path: Path, messages: list[dict[str, Any]], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Send requests to a running agent and return its replies, in order."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(path, limit=MAX_LINE), timeout
    )
    try:
        replies = []
        for message in messages:
            writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        for _ in messages:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise ConnectionError("the agent closed the socket")
            replies.append(json.loads(line))
        return replies
    finally:
        writer.close()


async def request_stream(
    path: Path,
    message: dict[str, Any],
    on_progress: Callable[[dict[str, Any]], None],
    idle_timeout: float = 120.0,
) -> dict[str, Any]:
    """Send one request whose answer is preceded by progress lines (``sync``, ``reinit``):
    ``on_progress`` gets each; returns the final reply."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(path, limit=MAX_LINE), idle_timeout
    )
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), idle_timeout)
            if not line:
                raise ConnectionError("the agent closed the socket")
            reply = json.loads(line)
            if isinstance(reply, dict) and "progress" in reply and len(reply) == 1:
                on_progress(reply["progress"])
                continue
            return dict(reply)
    finally:
        writer.close()
