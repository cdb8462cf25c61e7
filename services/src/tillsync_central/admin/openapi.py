"""The OpenAPI 3.1 document of the admin API, built from the endpoint table (served at
``GET /api/openapi.json``); a test checks it against the app's routes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .auth import CSRF_HEADER, Endpoint

__all__ = ["openapi_document"]

_QUERY: dict[str, tuple[str, dict[str, Any]]] = {
    "center": ("A center id", {"type": "string"}),
    "register": ("A register id", {"type": "string"}),
    "type": ("A document type (receipt, shift_close, …)", {"type": "string"}),
    "from": ("First day, YYYY-MM-DD (UTC)", {"type": "string", "format": "date"}),
    "to": ("Last day, YYYY-MM-DD (UTC), included", {"type": "string", "format": "date"}),
    "since": ("Only syncs that finished at or after this instant", {"type": "string"}),
    "cursor": ("The next_cursor of the previous page", {"type": "string"}),
    "limit": ("Rows per page", {"type": "integer", "minimum": 1}),
    "offset": ("Rows to skip", {"type": "integer", "minimum": 0}),
    "state": ("online, offline, never_seen or revoked", {"type": "string"}),
    "search": ("A substring of the id (or name)", {"type": "string"}),
    "attention": ("Only offline or catalog-lagging registers", {"type": "boolean"}),
    "sort": ("Sort column", {"type": "string"}),
    "desc": ("Sort descending", {"type": "boolean"}),
    "kind": ("documents, catalog_delta or reinit", {"type": "string"}),
    "result": ("successful, partially_successful or failed", {"type": "string"}),
    "status": ("new, replayed or discarded", {"type": "string"}),
    "code": ("An error code (docs/errors.md)", {"type": "string"}),
    "source": ("ingest, dlx or presence", {"type": "string"}),
    "resolved": ("Include resolved conflicts", {"type": "boolean"}),
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "field", "reason"],
            "properties": {
                "code": {"type": "string", "description": "stable code, docs/errors.md"},
                "field": {"type": "string"},
                "reason": {"type": "string"},
            },
        }
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"\{([^}]+)\}", endpoint.path)
    ]
    for name in endpoint.query:
        description, schema = _QUERY[name]
        parameters.append(
            {"name": name, "in": "query", "required": False, "description": description,
             "schema": schema}
        )  # fmt: skip
    media = "text/event-stream" if endpoint.path == "/api/events" else "application/json"
    ok = "201" if endpoint.action in ("login", "operator.add") else "200"
    responses: dict[str, Any] = {
        ok: {"description": "OK", "content": {media: {"schema": {"type": "object"}}}},
        "400": _error("Malformed input"),
        "422": _error("Invalid input (code, field, reason)"),
    }
    if endpoint.role is not None:
        responses["401"] = _error("No valid session or token")
        responses["403"] = _error(f"Needs the {endpoint.role} role (or a CSRF token)")
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": f"{endpoint.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', endpoint.path)}",
        "tags": [endpoint.tag] if endpoint.tag else [],
        "parameters": parameters,
        "responses": responses,
        "x-tillsync-role": endpoint.role,
    }
    if endpoint.role is None:
        operation["security"] = []
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": endpoint.body}},
        }
    return operation


def openapi_document(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tillsync central admin API",
            "version": "1",
            "description": (
                "Operators' API of the dashboard (docs/admin.md). Authenticate with a "
                "bearer token from POST /api/sessions, or the dashboard's session cookie "
                f"plus the {CSRF_HEADER} header on writes."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "tillsync_session"},
            },
        },
        "security": [{"bearer": []}, {"cookie": []}],
    }
