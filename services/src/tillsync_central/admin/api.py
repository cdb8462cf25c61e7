"""The admin JSON API's handlers (the table of endpoints, with the role each needs, is
:data:`tillsync_central.admin.endpoints.ENDPOINTS`).

Pagination is ``limit`` plus either an opaque ``cursor`` (documents, dead letters, the
catalog: keyset, stable under inserts) or ``offset`` (the fleet, sortable by any column).
Filters are query parameters: ``center``, ``register``, ``type``, ``from``/``to`` (days,
UTC) and what each list adds. See ``docs/admin.md``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tillsync_protocol import ENTITIES, InvalidValueError, MissingFieldError, WrongTypeError

from ..catalog import CatalogEditor
from ..commands import ReinitOrder, registers_for, send_reinit
from . import dead_letters as letters
from .audit import AUDIT_PAGE, recent
from .auth import Written, read_json
from .catalog_browse import catalog_page, catalog_scopes
from .context import AdminContext
from .documents import DocumentQuery, document_detail, document_page, receipt_days, zreport_page
from .errors import AdminError
from .fleet import FLEET_SORTS, FLEET_STATES, FleetQuery, center_totals, fleet_page
from .live import sse_frames
from .operators import add_operator, list_operators
from .paging import (
    choice_param,
    date_param,
    decode_cursor,
    encode_cursor,
    int_param,
    limit_param,
    text_param,
)
from .sessions import Session, create_session, delete_session
from .syncs import SYNC_KINDS, SYNC_RESULTS, sync_page

__all__ = [
    "day_range",
    "document_query",
    "fleet_query",
    "read_dead_letters",
    "read_syncs",
]


def _str_field(payload: Any, name: str, *, required: bool = True, max_len: int = 1000) -> str:
    value = payload.get(name) if isinstance(payload, dict) else None
    if value is None:
        if required:
            raise MissingFieldError(f"{name} is required", field=name)
        return ""
    if not isinstance(value, str):
        raise WrongTypeError(f"{name} is a string", field=name)
    if required and not value.strip():
        raise MissingFieldError(f"{name} may not be empty", field=name)
    if len(value) > max_len:
        raise InvalidValueError(f"{name} has at most {max_len} characters", field=name)
    return value.strip()


# -- sessions ------------------------------------------------------------------------------


async def login(ctx: AdminContext, request: Request, session: Session | None) -> Written:
    payload = await read_json(request)
    username = _str_field(payload, "username", max_len=63)
    password = _str_field(payload, "password", max_len=1000)
    operator = await ctx.log_in(username, password)
    lifetime = timedelta(hours=ctx.settings.admin_session_hours)
    created = await create_session(ctx.pool, operator, lifetime, "token")
    body = {
        "token": created.token,
        "username": operator.username,
        "role": operator.role,
        "expires_at": (datetime.now(UTC) + lifetime).isoformat(),
    }
    return Written(body, operator.username, {"kind": "token"}, status=201)


async def logout(ctx: AdminContext, request: Request, session: Session) -> Written:
    await delete_session(ctx.pool, session.token)
    return Written({"ok": True}, session.operator.username, {"kind": session.kind})


async def me(ctx: AdminContext, request: Request, session: Session) -> Response:
    return JSONResponse({**session.operator.to_dict(), "session": session.kind})


# -- fleet and syncs -----------------------------------------------------------------------


def fleet_query(request: Request, default_limit: int = 100) -> FleetQuery:
    params = request.query_params
    sort = choice_param(params, "sort", tuple(FLEET_SORTS)) or "register"
    return FleetQuery(
        center=text_param(params, "center"),
        state=choice_param(params, "state", FLEET_STATES),
        search=text_param(params, "search"),
        attention=params.get("attention") in ("1", "true", "on"),
        sort=sort,
        descending=params.get("desc") in ("1", "true", "on"),
        limit=int_param(params, "limit", default_limit, 1, 1000),
        offset=int_param(params, "offset", 0, 0, 10**9),
    )


async def fleet(ctx: AdminContext, request: Request, session: Session) -> Response:
    query = fleet_query(request)
    rows, total = await fleet_page(ctx.pool, ctx.offline_after_s, query)
    following = query.offset + len(rows)
    return JSONResponse(
        {
            "registers": rows,
            "total": total,
            "offset": query.offset,
            "next_offset": following if following < total else None,
            "offline_after_s": ctx.offline_after_s,
        }
    )


async def centers(ctx: AdminContext, request: Request, session: Session) -> Response:
    return JSONResponse({"centers": await center_totals(ctx.pool, ctx.offline_after_s)})


async def read_syncs(ctx: AdminContext, params: QueryParams) -> list[dict[str, Any]]:
    """The sync history a query string asks for (the API's and the page's)."""
    since_text = text_param(params, "since")
    since = None
    if since_text is not None:
        try:
            since = datetime.fromisoformat(since_text)
        except ValueError:
            raise InvalidValueError("since is an ISO 8601 instant", field="since") from None
    return await sync_page(
        ctx.pool,
        register=text_param(params, "register"),
        center=text_param(params, "center"),
        kind=choice_param(params, "kind", SYNC_KINDS),
        result=choice_param(params, "result", SYNC_RESULTS),
        since=since or date_param(params, "from"),
        until=date_param(params, "to", end=True),
        limit=limit_param(params),
        offset=int_param(params, "offset", 0, 0, 10**9),
    )


async def syncs(ctx: AdminContext, request: Request, session: Session) -> Response:
    return JSONResponse({"syncs": await read_syncs(ctx, request.query_params)})


# -- documents -----------------------------------------------------------------------------


def document_query(request: Request) -> DocumentQuery:
    params = request.query_params
    cursor = decode_cursor(params, 3)
    after = None
    if cursor is not None:
        try:
            after = (datetime.fromisoformat(cursor[0]), str(cursor[1]), int(cursor[2]))
        except (TypeError, ValueError):
            raise InvalidValueError("cursor is not one this API gave", field="cursor") from None
    return DocumentQuery(
        center=text_param(params, "center"),
        register=text_param(params, "register"),
        doc_type=text_param(params, "type"),
        since=date_param(params, "from"),
        until=date_param(params, "to", end=True),
        after=after,
        limit=limit_param(params),
    )


async def documents(ctx: AdminContext, request: Request, session: Session) -> Response:
    rows, following = await document_page(ctx.pool, document_query(request))
    cursor = None if following is None else encode_cursor(following)
    return JSONResponse({"documents": rows, "next_cursor": cursor})


async def document(ctx: AdminContext, request: Request, session: Session) -> Response:
    register_id = request.path_params["register_id"]
    try:
        seq = int(request.path_params["seq"])
    except ValueError:
        raise InvalidValueError("seq is an integer", field="seq") from None
    detail = await document_detail(ctx.pool, register_id, seq)
    if detail is None:
        raise AdminError(f"no document {register_id}/{seq}", field="seq", code="not_found")
    return JSONResponse(detail)


def day_range(request: Request, days: int = 7) -> tuple[datetime, datetime]:
    params = request.query_params
    until = date_param(params, "to", end=True)
    if until is None:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        until = today + timedelta(days=1)
    since = date_param(params, "from") or until - timedelta(days=days)
    if since >= until:
        raise InvalidValueError("from is before to", field="from")
    if until - since > timedelta(days=366):
        raise InvalidValueError("at most 366 days at once", field="from")
    return since, until


async def receipts_by_day(ctx: AdminContext, request: Request, session: Session) -> Response:
    since, until = day_range(request)
    params = request.query_params
    rows = await receipt_days(
        ctx.pool, text_param(params, "center"), text_param(params, "register"), since, until
    )
    return JSONResponse({"days": rows, "from": since.date().isoformat()})


async def zreports(ctx: AdminContext, request: Request, session: Session) -> Response:
    params = request.query_params
    rows = await zreport_page(
        ctx.pool,
        text_param(params, "center"),
        text_param(params, "register"),
        date_param(params, "from"),
        date_param(params, "to", end=True),
        limit_param(params),
        int_param(params, "offset", 0, 0, 10**9),
    )
    return JSONResponse({"zreports": rows})


# -- dead letters and conflicts ------------------------------------------------------------


def _letter_id(request: Request) -> int:
    try:
        return int(request.path_params["letter_id"])
    except ValueError:
        raise InvalidValueError("a dead letter id is an integer", field="id") from None


async def read_dead_letters(
    ctx: AdminContext, params: QueryParams
) -> tuple[list[dict[str, Any]], str | None]:
    """The dead letters a query string asks for, and the cursor of the next page."""
    limit = limit_param(params)
    cursor = decode_cursor(params, 1)
    before = int(cursor[0]) if cursor and isinstance(cursor[0], int) else None
    rows = await letters.dead_letter_page(
        ctx.pool,
        choice_param(params, "status", letters.DL_STATUSES),
        text_param(params, "code"),
        choice_param(params, "source", letters.DL_SOURCES),
        text_param(params, "register"),
        before,
        limit,
    )
    return rows, encode_cursor([rows[-1]["id"]]) if len(rows) == limit else None


async def dead_letter_list(ctx: AdminContext, request: Request, session: Session) -> Response:
    rows, following = await read_dead_letters(ctx, request.query_params)
    return JSONResponse({"dead_letters": rows, "next_cursor": following})


async def dead_letter_counts(ctx: AdminContext, request: Request, session: Session) -> Response:
    return JSONResponse({"codes": await letters.dead_letter_counts(ctx.pool)})


async def dead_letter(ctx: AdminContext, request: Request, session: Session) -> Response:
    return JSONResponse(await letters.dead_letter_detail(ctx.pool, _letter_id(request)))


async def replay(ctx: AdminContext, request: Request, session: Session) -> Written:
    letter_id = _letter_id(request)
    payload = await read_json(request, empty={})
    note = _str_field(payload, "note", required=False)
    done = await letters.replay(ctx.pool, ctx.settings, letter_id, note)
    return Written(done.to_dict(), f"dead_letter:{letter_id}", {"note": note, **done.to_dict()})


async def discard(ctx: AdminContext, request: Request, session: Session) -> Written:
    letter_id = _letter_id(request)
    reason = _str_field(await read_json(request), "reason")
    await letters.discard(ctx.pool, letter_id, reason)
    return Written(
        {"ok": True, "status": "discarded"}, f"dead_letter:{letter_id}", {"reason": reason}
    )


async def conflicts(ctx: AdminContext, request: Request, session: Session) -> Response:
    params = request.query_params
    rows = await letters.conflict_page(
        ctx.pool, params.get("resolved") in ("1", "true"), limit_param(params)
    )
    return JSONResponse({"conflicts": rows})


async def resolve(ctx: AdminContext, request: Request, session: Session) -> Written:
    try:
        conflict_id = int(request.path_params["conflict_id"])
    except ValueError:
        raise InvalidValueError("a conflict id is an integer", field="id") from None
    resolution = _str_field(await read_json(request), "resolution")
    await letters.resolve_conflict(ctx.pool, conflict_id, resolution)
    return Written({"ok": True}, f"conflict:{conflict_id}", {"resolution": resolution})


# -- queues --------------------------------------------------------------------------------


async def queues(ctx: AdminContext, request: Request, session: Session) -> Response:
    current = await ctx.monitor.sample()
    return JSONResponse(
        {
            "queues": [q.to_dict() for q in current],
            "history": {
                name: [[round(t, 3), depth] for t, depth in points]
                for name, points in ctx.monitor.history.items()
            },
        }
    )


# -- catalog and commands ------------------------------------------------------------------


def _entity(request: Request) -> str:
    entity = request.path_params["entity"]
    if entity not in ENTITIES:
        raise InvalidValueError(
            f"{entity!r} is not a catalog entity (one of {', '.join(ENTITIES)})", field="entity"
        )
    return str(entity)


async def scopes(ctx: AdminContext, request: Request, session: Session) -> Response:
    return JSONResponse({"scopes": await catalog_scopes(ctx.pool), "entities": list(ENTITIES)})


async def catalog_list(ctx: AdminContext, request: Request, session: Session) -> Response:
    params = request.query_params
    cursor = decode_cursor(params, 1)
    rows, following = await catalog_page(
        ctx.pool,
        request.path_params["scope"],
        _entity(request),
        None if cursor is None else str(cursor[0]),
        text_param(params, "search"),
        limit_param(params),
    )
    return JSONResponse(
        {"entries": rows, "next_cursor": None if following is None else encode_cursor([following])}
    )


async def catalog_put(ctx: AdminContext, request: Request, session: Session) -> Written:
    scope, entity, key = (request.path_params[k] for k in ("scope", "entity", "key"))
    payload = await read_json(request)
    if not isinstance(payload, dict) or "state" not in payload:
        raise MissingFieldError('a catalog edit is {"state": {...}}', field="state")
    editor = CatalogEditor(ctx.pool, changed_by=f"admin:{session.operator.username}")
    change = await editor.upsert(scope, entity, key, payload["state"])
    body = {
        "scope": change.scope,
        "entity": change.entity,
        "key": change.key,
        "scope_seq": change.scope_seq,
        "version": change.version,
        "state": change.state,
    }
    return Written(
        body, f"{scope}/{entity}/{key}", {"state": change.state, "version": change.version}
    )


async def catalog_delete(ctx: AdminContext, request: Request, session: Session) -> Written:
    scope, entity, key = (request.path_params[k] for k in ("scope", "entity", "key"))
    editor = CatalogEditor(ctx.pool, changed_by=f"admin:{session.operator.username}")
    change = await editor.delete(scope, entity, key)
    body = {
        "deleted": change is not None,
        "scope_seq": None if change is None else change.scope_seq,
    }
    return Written(body, f"{scope}/{entity}/{key}", body)


async def reinit(ctx: AdminContext, request: Request, session: Session) -> Written:
    payload = await read_json(request)
    register = _str_field(payload, "register", required=False, max_len=63) or None
    center = _str_field(payload, "center", required=False, max_len=63) or None
    if (register is None) == (center is None):
        raise InvalidValueError("name exactly one of register and center", field="register")
    mode = payload.get("mode")
    if mode not in ("update", "replace"):
        raise InvalidValueError("mode is update or replace", field="mode")
    with_customers = payload.get("with_customers", True)
    if not isinstance(with_customers, bool):
        raise WrongTypeError("with_customers is a boolean", field="with_customers")
    entities = payload.get("entities")
    if entities is not None and (
        not isinstance(entities, list) or not all(isinstance(e, str) for e in entities)
    ):
        raise WrongTypeError("entities is a list of entity names", field="entities")
    targets = await registers_for(ctx.pool, register_id=register, center_id=center)
    order = ReinitOrder(
        mode=mode,
        with_customers=with_customers,
        entities=entities,
        requested_by=f"admin:{session.operator.username}",
    )
    sent_at = datetime.now(UTC)
    commands = await send_reinit(ctx.settings, targets, order) if targets else []
    body = {
        "registers": targets,
        "command_ids": [c.body.command_id for c in commands],
        "sent_at": sent_at.isoformat(),
        "mode": mode,
        "with_customers": with_customers,
    }
    return Written(body, f"register:{register}" if register else f"center:{center}", body)


# -- operators and audit -------------------------------------------------------------------


async def operators(ctx: AdminContext, request: Request, session: Session) -> Response:
    return JSONResponse({"operators": [o.to_dict() for o in await list_operators(ctx.pool)]})


async def operator_add(ctx: AdminContext, request: Request, session: Session) -> Written:
    payload = await read_json(request)
    created = await add_operator(
        ctx.pool,
        _str_field(payload, "username", max_len=63),
        _str_field(payload, "role", max_len=20),
        _str_field(payload, "password", max_len=1000),
    )
    return Written(created.to_dict(), f"operator:{created.username}", {"role": created.role}, 201)


async def audit(ctx: AdminContext, request: Request, session: Session) -> Response:
    params = request.query_params
    cursor = decode_cursor(params, 1)
    limit = int_param(params, "limit", AUDIT_PAGE, 1, 1000)
    rows = await recent(ctx.pool, int(cursor[0]) if cursor else None, limit)
    following = encode_cursor([rows[-1]["id"]]) if len(rows) == limit else None
    return JSONResponse({"entries": rows, "next_cursor": following})


# -- events and description ----------------------------------------------------------------


async def events(ctx: AdminContext, request: Request, session: Session) -> Response:
    subscriber = ctx.feed.subscribe()
    return StreamingResponse(
        sse_frames(ctx.feed, subscriber),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def health(ctx: AdminContext, request: Request, session: Session | None) -> Response:
    started = time.perf_counter()
    await ctx.pool.fetchval("SELECT 1")
    return JSONResponse(
        {"ok": True, "database_ms": round((time.perf_counter() - started) * 1000, 1)}
    )
