"""The OpenAPI 3.1 description of the local API (:mod:`local_api`), as data: served at
``GET /v1/openapi.json``; a test checks that every route is in it and that real answers
match it."""

from __future__ import annotations

from typing import Any

from tillsync_protocol import ENTITIES

from . import __version__

__all__ = ["OPENAPI"]

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*names: str) -> dict[str, Schema]:
    statuses = {
        "Malformed": "400",
        "Unauthorized": "401",
        "NotFound": "404",
        "Busy": "409",
        "Invalid": "422",
        "NotConnected": "503",
        "TooLarge": "413",
    }
    chosen = ("Unauthorized", *names)
    return {statuses[n]: {"$ref": f"#/components/responses/{n}"} for n in chosen}


def _body(schema: Schema, description: str, required: bool = True) -> Schema:
    return {
        "required": required,
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


_NULLABLE_INT = {"type": ["integer", "null"]}
_OBJECT = {"type": "object"}

_SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "field", "reason"],
                "properties": {
                    "code": {"type": "string", "description": "stable code, docs/errors.md"},
                    "field": {"type": "string", "description": "the field concerned, or ''"},
                    "reason": {"type": "string"},
                },
            }
        },
    },
    "Document": {
        "type": "object",
        "required": ["type", "body"],
        "properties": {
            "type": {"type": "string", "description": "receipt, refund, shift_close, …"},
            "body": {"type": "object", "description": "the body as in docs/protocol.md"},
        },
    },
    "Submitted": {
        "type": "object",
        "required": ["seq", "doc_id", "type"],
        "properties": {
            "seq": {"type": "integer", "minimum": 1},
            "doc_id": {"type": "string", "format": "uuid"},
            "type": {"type": "string"},
        },
    },
    "SubmittedMany": {
        "type": "object",
        "required": ["ok", "stored", "results"],
        "properties": {
            "ok": {"type": "boolean", "description": "every document was stored"},
            "stored": {"type": "integer"},
            "results": {
                "type": "array",
                "description": "one per document, in order: Submitted or {error}",
                "items": {"oneOf": [_ref("Submitted"), _ref("Error")]},
            },
        },
    },
    "Status": {
        "type": "object",
        "required": [
            "register_id",
            "center_id",
            "agent_version",
            "running",
            "connected",
            "pending",
            "rejected",
            "acknowledged",
            "last_seq",
            "link",
            "catalog",
        ],
        "properties": {
            "register_id": {"type": "string"},
            "center_id": {"type": "string"},
            "agent_version": {"type": "string"},
            "running": {"type": "boolean"},
            "connected": {"type": "boolean"},
            "pending": {"type": "integer", "description": "exact: not yet acknowledged"},
            "rejected": {"type": "integer"},
            "acknowledged": {"type": "integer"},
            "last_seq": {"type": "integer"},
            "last_successful_send_at": _NULLABLE_INT,
            "last_error": {"type": ["string", "null"]},
            "link": _OBJECT,
            "catalog": _OBJECT,
            "documents_sync": _OBJECT,
        },
    },
    "Entry": {
        "type": "object",
        "required": ["entity", "key", "scope", "version", "scope_seq", "state", "local_edit"],
        "properties": {
            "entity": {"type": "string", "enum": list(ENTITIES)},
            "key": {"type": "string"},
            "scope": {"type": "string", "description": "global or this register's center"},
            "version": {"type": "integer"},
            "scope_seq": {"type": "integer"},
            "state": _OBJECT,
            "local_edit": {"type": "boolean", "description": "an edit awaits central"},
        },
    },
    "Price": {
        "type": "object",
        "required": ["item_key", "gross_price", "currency", "source"],
        "properties": {
            "item_key": {"type": "string"},
            "gross_price": {"type": "integer", "description": "minor units"},
            "currency": {"type": "string"},
            "source": {"type": "string", "enum": ["center", "global"]},
        },
    },
    "Item": {
        "allOf": [_ref("Entry")],
        "type": "object",
        "required": ["price"],
        "properties": {"price": {"oneOf": [_ref("Price"), {"type": "null"}]}},
    },
    "Items": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": _ref("Item")}},
    },
    "Entries": {
        "type": "object",
        "required": ["entries"],
        "properties": {"entries": {"type": "array", "items": _ref("Entry")}},
    },
    "SyncReport": {
        "type": "object",
        "required": [
            "run_id",
            "kind",
            "mode",
            "trigger",
            "result",
            "pages",
            "received",
            "applied",
            "cursors",
            "duration_ms",
            "errors",
            "nothing_new",
        ],
        "properties": {
            "run_id": {"type": "integer"},
            "kind": {"type": "string", "enum": ["catalog_delta", "reinit"]},
            "mode": {"type": "string", "enum": ["delta", "update", "replace"]},
            "trigger": {"type": "string"},
            "result": _ref("Result"),
            "pages": {"type": "integer"},
            "received": {"type": "integer"},
            "applied": {"type": "integer"},
            "cursors": {"type": "object", "additionalProperties": {"type": "integer"}},
            "duration_ms": {"type": "integer"},
            "errors": {"type": "array", "items": {"type": "string"}},
            "nothing_new": {"type": "boolean"},
        },
    },
    "Result": {"type": "string", "enum": ["successful", "partially_successful", "failed"]},
    "SyncRun": {
        "type": "object",
        "required": [
            "id",
            "kind",
            "started_at",
            "finished_at",
            "result",
            "sent",
            "received",
            "errors",
            "detail",
        ],
        "properties": {
            "id": {"type": "integer"},
            "kind": {"type": "string", "enum": ["documents", "catalog_delta", "reinit"]},
            "started_at": {"type": "integer", "description": "ms since the epoch"},
            "finished_at": _NULLABLE_INT,
            "result": {"type": ["string", "null"], "description": "null while it runs"},
            "sent": {"type": "integer"},
            "received": {"type": "integer"},
            "errors": {"type": "array", "items": {"type": "string"}},
            "detail": {"type": "object", "description": "trigger, mode, cursors…"},
        },
    },
    "History": {
        "type": "object",
        "required": ["runs"],
        "properties": {"runs": {"type": "array", "items": _ref("SyncRun")}},
    },
    "CatalogSync": {
        "type": "object",
        "properties": {
            "entities": {"type": ["array", "null"], "items": {"type": "string"}},
        },
    },
    "Reinit": {
        "type": "object",
        "required": ["mode"],
        "properties": {
            "mode": {"type": "string", "enum": ["update", "replace"]},
            "with_customers": {"type": "boolean", "default": True},
            "entities": {"type": ["array", "null"], "items": {"type": "string"}},
        },
    },
    "ItemEdit": {
        "type": "object",
        "required": ["changes"],
        "properties": {"changes": {"type": "object", "description": "field → new value"}},
    },
}

_RESPONSES: dict[str, Schema] = {
    "Malformed": _json(_ref("Error"), "the body is not JSON (code malformed)"),
    "Unauthorized": _json(_ref("Error"), "no or a wrong bearer token (code unauthorized)"),
    "NotFound": _json(_ref("Error"), "no such item or entry (unknown_item, no_price, not_found)"),
    "Busy": _json(_ref("Error"), "a sync of this kind runs already (code sync_busy)"),
    "Invalid": _json(_ref("Error"), "a field is missing or invalid (protocol error codes)"),
    "NotConnected": _json(_ref("Error"), "the agent is stopping (code not_connected)"),
    "TooLarge": _json(_ref("Error"), "over 16 MiB, or a document over 1 MiB (too_large)"),
}


def _key(name: str, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} | {
        "description": description
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema} | {
        "description": description
    }


_PATHS: dict[str, Schema] = {
    "/v1/documents": {
        "post": {
            "summary": "Store one document, or several (a JSON array), durably",
            "description": "Returns after the SQLite commit, with the dense seq and doc_id. "
            "An array is committed together; each element gets its own result.",
            "requestBody": _body(
                {"oneOf": [_ref("Document"), {"type": "array", "items": _ref("Document")}]},
                "a document {type, body}, or an array of up to 1000",
            ),
            "responses": {
                "201": _json(
                    {"oneOf": [_ref("Submitted"), _ref("SubmittedMany")]},
                    "stored (every one, for an array)",
                ),
                "200": _json(_ref("SubmittedMany"), "an array of which some were refused"),
                **_errors("Malformed", "TooLarge", "Invalid"),
            },
        }
    },
    "/v1/status": {
        "get": {
            "summary": "Counts (pending is exact), link, catalog and sync state",
            "responses": {"200": _json(_ref("Status"), "the agent's status"), **_errors()},
        }
    },
    "/v1/catalog/items": {
        "get": {
            "summary": "Find items by barcode, or search names, keys and barcodes",
            "parameters": [
                _query("barcode", {"type": "string"}, "an exact barcode (0 or 1 result)"),
                _query("search", {"type": "string"}, "part of a name (any case), a key"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "20"),
            ],
            "responses": {"200": _json(_ref("Items"), "the items found"), **_errors("Invalid")},
        }
    },
    "/v1/catalog/items/{key}": {
        "get": {
            "summary": "One item with its price in this register's center",
            "parameters": [_key("key", "the item's key")],
            "responses": {
                "200": _json(_ref("Item"), "the item"),
                **_errors("NotFound"),
            },
        }
    },
    "/v1/catalog/items/{key}/edit": {
        "post": {
            "summary": "Edit an item here and send central an item_edit document",
            "parameters": [_key("key", "the item's key")],
            "requestBody": _body(_ref("ItemEdit"), "the fields to change"),
            "responses": {
                "201": _json(_ref("Submitted"), "the item_edit document stored"),
                **_errors("Malformed", "NotFound", "Invalid"),
            },
        }
    },
    "/v1/catalog/prices/{item_key}": {
        "get": {
            "summary": "The price of an item here (a center price overrides the global one)",
            "parameters": [_key("item_key", "the item's key")],
            "responses": {"200": _json(_ref("Price"), "the price"), **_errors("NotFound")},
        }
    },
    "/v1/catalog/{entity}": {
        "get": {
            "summary": "Every row of a catalog entity (a center row hides the global one)",
            "parameters": [_key("entity", f"one of {', '.join(ENTITIES)}")],
            "responses": {"200": _json(_ref("Entries"), "the rows"), **_errors("Invalid")},
        }
    },
    "/v1/catalog/{entity}/{key}": {
        "get": {
            "summary": "One row of a catalog entity",
            "parameters": [_key("entity", "a catalog entity"), _key("key", "its key")],
            "responses": {
                "200": _json(_ref("Entry"), "the row"),
                **_errors("NotFound", "Invalid"),
            },
        }
    },
    "/v1/sync/catalog": {
        "post": {
            "summary": "Ask central now for catalog changes since the cursors (a delta)",
            "requestBody": _body(_ref("CatalogSync"), "optional: only these entities", False),
            "responses": {
                "200": _json(_ref("SyncReport"), "how the run ended (result may be failed)"),
                **_errors("Malformed", "Busy", "Invalid", "NotConnected"),
            },
        }
    },
    "/v1/sync/reinit": {
        "post": {
            "summary": "Reload the catalog from a snapshot (update or replace)",
            "requestBody": _body(_ref("Reinit"), "mode, with_customers, entities"),
            "responses": {
                "200": _json(_ref("SyncReport"), "how the run ended (result may be failed)"),
                **_errors("Malformed", "Busy", "Invalid", "NotConnected"),
            },
        }
    },
    "/v1/sync/documents": {
        "post": {
            "summary": "Resend every unacknowledged document now and wait for the answers",
            "responses": {
                "200": _json(_ref("SyncRun"), "the documents sync run (result may be failed)"),
                **_errors("Busy", "NotConnected"),
            },
        }
    },
    "/v1/history": {
        "get": {
            "summary": "The latest syncs, newest first",
            "parameters": [
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "50"),
                _query(
                    "kind",
                    {"type": "string", "enum": ["documents", "catalog_delta", "reinit"]},
                    "only runs of this kind",
                ),
            ],
            "responses": {"200": _json(_ref("History"), "the runs"), **_errors("Invalid")},
        }
    },
    "/v1/events": {
        "get": {
            "summary": "Server-sent events: catalog changes and sync results",
            "description": "event `ready` {register_id, last_seq, pending} first; then "
            "`catalog` {entity, key, scope, op, version, source} per committed change, `sync` "
            "(a SyncRun) per finished sync, `dropped` {count} when this client fell more than "
            "catalog_queue_size events behind (re-read what it shows); a `: keepalive` "
            "comment every 15 s when idle.",
            "responses": {
                "200": {
                    "description": "the event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                **_errors(),
            },
        }
    },
    "/v1/openapi.json": {
        "get": {
            "summary": "This document (no token needed)",
            "security": [],
            "responses": {"200": _json(_OBJECT, "OpenAPI 3.1")},
        }
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "tillsync agent local API",
        "version": __version__,
        "description": "The register agent's API for POS apps, on 127.0.0.1 only. "
        "Every error is {error: {code, field, reason}} (docs/errors.md).",
    },
    "servers": [{"url": "http://127.0.0.1:8765", "description": "api_port of the agent"}],
    "security": [{"bearer": []}],
    "paths": _PATHS,
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "api_token from the agent's config",
            }
        },
        "schemas": _SCHEMAS,
        "responses": _RESPONSES,
    },
}
