"""The agent's local socket: other processes on the till (``tillsync-agent submit``,
``status``) talk to the running service through it, so there is only ever one writer.

Protocol: one JSON object per line in, one JSON object per line out.
``{"op": "submit", "type": "receipt", "body": {...}}`` → ``{"ok": true, "seq": 7, "doc_id": "…"}``
or ``{"ok": false, "error": {"code", "field", "reason"}}``; ``{"op": "status"}`` → the status.
The socket file is created with mode 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from tillsync_protocol import TillsyncError

if TYPE_CHECKING:
    from .service import Agent

__all__ = ["ControlSocket", "request"]

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
                reply = await self._handle(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.debug("control socket client gone", error=str(exc))
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> dict[str, Any]:
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
        if op != "submit":
            return _error("invalid_value", "op", f"unknown op {op!r}")
        return await self._submit(request)

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
