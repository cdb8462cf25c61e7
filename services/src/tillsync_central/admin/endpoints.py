"""The admin API's endpoints, in one table: method, path, handler, the least role each
needs (reads for every operator; writes for supervisors: catalog, commands, dead letters,
conflicts; operators and the audit log for administrators), its audit action and its
OpenAPI description. :func:`~tillsync_central.admin.auth.api_route` enforces the role on
every one, and the tests walk this table."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .api import (
    audit,
    catalog_delete,
    catalog_list,
    catalog_put,
    centers,
    conflicts,
    dead_letter,
    dead_letter_counts,
    dead_letter_list,
    discard,
    document,
    documents,
    events,
    fleet,
    health,
    login,
    logout,
    me,
    operator_add,
    operators,
    queues,
    receipts_by_day,
    reinit,
    replay,
    resolve,
    scopes,
    syncs,
    zreports,
)
from .auth import Endpoint
from .context import AdminContext
from .openapi import openapi_document
from .sessions import Session

__all__ = ["ENDPOINTS"]


async def openapi(ctx: AdminContext, request: Request, session: Session | None) -> Response:
    return JSONResponse(openapi_document(ENDPOINTS))


_PAGE = ("limit",)
_DAYS = ("center", "register", "from", "to")
_STR = {"type": "string"}
_OBJ = {"type": "object"}

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/api/openapi.json", openapi, None, "This document", tag="meta"),
    Endpoint("GET", "/api/health", health, None, "Liveness: the database answers", tag="meta"),
    Endpoint(
        "POST", "/api/sessions", login, None, "Log in: a bearer token", "login",
        body={"type": "object", "required": ["username", "password"],
              "properties": {"username": _STR, "password": _STR}},
        tag="sessions",
    ),
    Endpoint(
        "DELETE", "/api/sessions/current", logout, "viewer", "Log out", "logout", tag="sessions"
    ),
    Endpoint("GET", "/api/me", me, "viewer", "Who am I", tag="sessions"),
    Endpoint(
        "GET", "/api/fleet", fleet, "viewer", "Registers with presence, pending, lag",
        query=("center", "state", "search", "attention", "sort", "desc", "limit", "offset"),
        tag="fleet",
    ),
    Endpoint("GET", "/api/centers", centers, "viewer", "Per-center totals", tag="fleet"),
    Endpoint(
        "GET", "/api/syncs", syncs, "viewer", "Sync history from heartbeats",
        query=("register", "center", "kind", "result", "since", "from", "to", "limit", "offset"),
        tag="fleet",
    ),
    Endpoint(
        "GET", "/api/documents", documents, "viewer", "Documents, newest first",
        query=("center", "register", "type", "from", "to", "cursor", "limit"), tag="documents",
    ),
    Endpoint(
        "GET", "/api/documents/{register_id}/{seq}", document, "viewer",
        "One document, decoded and raw", tag="documents",
    ),
    Endpoint(
        "GET", "/api/receipts/days", receipts_by_day, "viewer",
        "Receipt totals per center, register and day", query=_DAYS, tag="documents",
    ),
    Endpoint(
        "GET", "/api/zreports", zreports, "viewer", "Closed shifts (Z-reports)",
        query=(*_DAYS, "limit", "offset"), tag="documents",
    ),
    Endpoint(
        "GET", "/api/dead-letters", dead_letter_list, "viewer", "Dead letters, newest first",
        query=("status", "code", "source", "register", "cursor", "limit"), tag="dead letters",
    ),
    Endpoint(
        "GET", "/api/dead-letters/counts", dead_letter_counts, "viewer", "Counts per code",
        tag="dead letters",
    ),
    Endpoint(
        "GET", "/api/dead-letters/{letter_id}", dead_letter, "viewer",
        "One dead letter, decoded and raw", tag="dead letters",
    ),
    Endpoint(
        "POST", "/api/dead-letters/{letter_id}/replay", replay, "supervisor",
        "Run a dead letter through ingest again", "dead_letter.replay",
        body={"type": "object", "properties": {"note": _STR}}, tag="dead letters",
    ),
    Endpoint(
        "POST", "/api/dead-letters/{letter_id}/discard", discard, "supervisor",
        "Discard a dead letter with a reason", "dead_letter.discard",
        body={"type": "object", "required": ["reason"], "properties": {"reason": _STR}},
        tag="dead letters",
    ),
    Endpoint(
        "GET", "/api/conflicts", conflicts, "viewer", "Document and catalog conflicts",
        query=("resolved", "limit"), tag="dead letters",
    ),
    Endpoint(
        "POST", "/api/conflicts/{conflict_id}/resolve", resolve, "supervisor",
        "Mark a document conflict resolved", "conflict.resolve",
        body={"type": "object", "required": ["resolution"], "properties": {"resolution": _STR}},
        tag="dead letters",
    ),
    Endpoint("GET", "/api/queues", queues, "viewer", "Queue depths and rates", tag="queues"),
    Endpoint("GET", "/api/catalog", scopes, "viewer", "Catalog scopes and entities", tag="catalog"),
    Endpoint(
        "GET", "/api/catalog/{scope}/{entity}", catalog_list, "viewer", "Live rows by key",
        query=("search", "cursor", "limit"), tag="catalog",
    ),
    Endpoint(
        "PUT", "/api/catalog/{scope}/{entity}/{key}", catalog_put, "supervisor",
        "Create or replace a row", "catalog.upsert",
        body={"type": "object", "required": ["state"], "properties": {"state": _OBJ}},
        tag="catalog",
    ),
    Endpoint(
        "DELETE", "/api/catalog/{scope}/{entity}/{key}", catalog_delete, "supervisor",
        "Delete a row", "catalog.delete", tag="catalog",
    ),
    Endpoint(
        "POST", "/api/commands/reinit", reinit, "supervisor",
        "Reload the catalog of a register or a center", "command.reinit",
        body={
            "type": "object", "required": ["mode"],
            "properties": {
                "register": _STR, "center": _STR, "mode": {"enum": ["update", "replace"]},
                "with_customers": {"type": "boolean"},
                "entities": {"type": "array", "items": _STR},
            },
        },
        tag="catalog",
    ),
    Endpoint("GET", "/api/operators", operators, "administrator", "Operators", tag="operators"),
    Endpoint(
        "POST", "/api/operators", operator_add, "administrator", "Add an operator",
        "operator.add",
        body={
            "type": "object", "required": ["username", "role", "password"],
            "properties": {
                "username": _STR, "password": _STR,
                "role": {"enum": ["administrator", "supervisor", "viewer"]},
            },
        },
        tag="operators",
    ),
    Endpoint(
        "GET", "/api/audit", audit, "administrator", "The audit log, newest first",
        query=("cursor", "limit"), tag="operators",
    ),
    Endpoint("GET", "/api/events", events, "viewer", "Server-sent events", tag="live"),
)  # fmt: skip
