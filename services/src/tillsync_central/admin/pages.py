"""The dashboard's HTML pages, rendered on the server from the same queries as the JSON
API (so a page is one round trip, fast with thousands of registers), plus the login and
logout forms. Writes from a page go through the JSON API (``static/app.js``), with the
page's CSRF token."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tillsync_protocol import DOCUMENT_TYPES, ENTITIES, GLOBAL_SCOPE, TillsyncError

from . import dead_letters as letters
from .api import day_range, document_query, fleet_query, read_dead_letters, read_syncs
from .audit import AUDIT_PAGE, recent, record
from .auth import CSRF_FIELD, page_route, session_of
from .catalog_browse import catalog_page, catalog_scopes
from .context import AdminContext
from .documents import document_detail, document_page, receipt_days, zreport_page
from .errors import AdminError
from .fleet import FLEET_STATES, FleetQuery, center_totals, fleet_page
from .operators import list_operators, role_allows
from .paging import choice_param, decode_cursor, encode_cursor, int_param, limit_param, text_param
from .queues import HISTORY, sparkline
from .sessions import COOKIE_NAME, Session, create_session, delete_session
from .syncs import SYNC_KINDS, SYNC_RESULTS

__all__ = ["page_routes"]


@dataclass(frozen=True)
class _FleetLinks:
    """The fleet query with link builders for the sort headers and the pager."""

    query: FleetQuery
    params: QueryParams

    def __getattr__(self, name: str) -> Any:
        return getattr(self.query, name)

    def _with(self, **values: object) -> str:
        merged = {**dict(self.params), **{k: str(v) for k, v in values.items()}}
        return urlencode({k: v for k, v in merged.items() if v not in ("", "False")})

    def with_sort(self, key: str) -> str:
        descending = not self.query.descending if self.query.sort == key else False
        return self._with(sort=key, desc="1" if descending else "", offset="0")

    def with_offset(self, offset: int) -> str:
        return self._with(offset=max(offset, 0))


def _next_link(params: QueryParams, cursor: str) -> str:
    return urlencode({**dict(params), "cursor": cursor})


def _render(
    ctx: AdminContext, request: Request, session: Session | None, name: str, **values: Any
) -> Response:
    page = name.removesuffix(".html").replace("_", "-")
    return ctx.templates.TemplateResponse(
        request,
        name,
        {
            "session": session,
            "page": values.pop("page", page),
            "title": values.pop("title", page),
            **values,
        },
        headers={"Cache-Control": "no-store"},
    )


async def fleet(ctx: AdminContext, request: Request, session: Session) -> Response:
    query = fleet_query(request)
    rows, total = await fleet_page(ctx.pool, ctx.offline_after_s, query)
    return _render(
        ctx, request, session, "fleet.html", title="Fleet",
        rows=rows, total=total, query=_FleetLinks(query, request.query_params),
        centers=await center_totals(ctx.pool, ctx.offline_after_s), states=FLEET_STATES,
        offline_after_s=ctx.offline_after_s,
    )  # fmt: skip


async def documents(ctx: AdminContext, request: Request, session: Session) -> Response:
    params = request.query_params
    query = document_query(request)
    rows, following = await document_page(ctx.pool, query)
    since, until = day_range(request)
    cursor = None if following is None else encode_cursor(following)
    return _render(
        ctx, request, session, "documents.html", title="Documents",
        f=dict(params), documents=rows, next_cursor=cursor,
        next_link=_next_link(params, cursor) if cursor else "",
        days=await receipt_days(ctx.pool, query.center, query.register, since, until),
        zreports=await zreport_page(ctx.pool, query.center, query.register, query.since,
                                    query.until, 50, 0),
        doc_types=sorted(DOCUMENT_TYPES),
    )  # fmt: skip


async def document(ctx: AdminContext, request: Request, session: Session) -> Response:
    register_id, seq = request.path_params["register_id"], request.path_params["seq"]
    detail = await document_detail(ctx.pool, register_id, int(seq)) if seq.isdigit() else None
    if detail is None:
        raise AdminError(f"no document {register_id}/{seq}", field="seq", code="not_found")
    return _render(
        ctx, request, session, "document.html", title="Document", page="documents", d=detail
    )


async def syncs(ctx: AdminContext, request: Request, session: Session) -> Response:
    params = request.query_params
    limit = limit_param(params)
    offset = int_param(params, "offset", 0, 0, 10**9)
    rows = await read_syncs(ctx, params)
    return _render(
        ctx, request, session, "syncs.html", title="Sync history",
        f=dict(params), syncs=rows, kinds=SYNC_KINDS, results=SYNC_RESULTS,
        more=len(rows) == limit, next_link=urlencode({**dict(params), "offset": offset + limit}),
    )  # fmt: skip


async def dead_letter_list(ctx: AdminContext, request: Request, session: Session) -> Response:
    params = request.query_params
    rows, following = await read_dead_letters(ctx, params)
    return _render(
        ctx, request, session, "dead_letters.html", title="Dead letters",
        f=dict(params), rows=rows, counts=await letters.dead_letter_counts(ctx.pool),
        statuses=letters.DL_STATUSES, next_cursor=following,
        next_link=_next_link(params, following) if following else "",
        conflicts=await letters.conflict_page(ctx.pool, False, 100),
        can_write=role_allows(session.operator.role, "supervisor"),
    )  # fmt: skip


async def dead_letter(ctx: AdminContext, request: Request, session: Session) -> Response:
    letter_id = request.path_params["letter_id"]
    if not letter_id.isdigit():
        raise AdminError(f"no dead letter {letter_id}", field="id", code="unknown_dead_letter")
    detail = await letters.dead_letter_detail(ctx.pool, int(letter_id))
    return _render(
        ctx, request, session, "dead_letter.html", title=f"Dead letter {letter_id}",
        page="dead-letters", d=detail,
        can_write=role_allows(session.operator.role, "supervisor"),
    )  # fmt: skip


async def queues(ctx: AdminContext, request: Request, session: Session) -> Response:
    error = None
    try:
        current = await ctx.monitor.sample()
    except TillsyncError as exc:
        current, error = ctx.monitor.latest, exc.reason
    charts = {q.name: sparkline(list(ctx.monitor.history.get(q.name, ()))) for q in current}
    minutes = round(HISTORY * ctx.settings.admin_queue_sample_s / 60)
    return _render(
        ctx, request, session, "queues.html", title="Queues",
        queues=current, charts=charts, error=error, history_minutes=minutes,
    )  # fmt: skip


async def catalog(ctx: AdminContext, request: Request, session: Session) -> Response:
    params = request.query_params
    scope = text_param(params, "scope") or GLOBAL_SCOPE
    entity = choice_param(params, "entity", ENTITIES) or "items"
    search = text_param(params, "search")
    cursor = decode_cursor(params, 1)
    entries, following = await catalog_page(
        ctx.pool, scope, entity, None if cursor is None else str(cursor[0]), search, 50
    )
    next_cursor = None if following is None else encode_cursor([following])
    return _render(
        ctx, request, session, "catalog.html", title="Catalog",
        scopes=await catalog_scopes(ctx.pool), entities=ENTITIES, scope=scope, entity=entity,
        search=search, entries=entries, next_cursor=next_cursor,
        next_link=_next_link(params, next_cursor) if next_cursor else "",
        can_write=role_allows(session.operator.role, "supervisor"),
    )  # fmt: skip


async def live(ctx: AdminContext, request: Request, session: Session) -> Response:
    return _render(ctx, request, session, "live.html", title="Live")


async def operators(ctx: AdminContext, request: Request, session: Session) -> Response:
    return _render(
        ctx, request, session, "operators.html", title="Operators",
        operators=await list_operators(ctx.pool), audit=await recent(ctx.pool, None, AUDIT_PAGE),
    )  # fmt: skip


LOGIN_CSRF_COOKIE = "tillsync_login_csrf"
LOGIN_CSRF_FIELD = "login_csrf"
LOGIN_CSRF_MAX_AGE_S = 3600


def _safe_next(value: str | None) -> str:
    """Only a path of this site (never ``//host`` or a scheme): no open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/fleet"
    return value


def _login_page(
    ctx: AdminContext, request: Request, next_page: str, error: str | None, status: int = 200
) -> Response:
    """The login form with a fresh login CSRF token, in a hidden field and in a cookie
    that only this site's own pages send back (``SameSite=Strict``): a form posted from
    another site has no cookie, so it cannot log the browser in as someone else."""
    token = secrets.token_urlsafe(32)
    response = _render(
        ctx, request, None, "login.html", title="Log in", next=next_page, error=error,
        login_csrf=token, login_csrf_field=LOGIN_CSRF_FIELD,
    )  # fmt: skip
    response.status_code = status
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        max_age=LOGIN_CSRF_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=ctx.settings.admin_secure_cookie,
        path="/login",
    )
    return response


def page_routes(ctx: AdminContext) -> list[Route]:
    async def login_form(request: Request) -> Response:
        return _login_page(ctx, request, _safe_next(request.query_params.get("next")), None)

    async def login(request: Request) -> Response:
        form = await request.form()
        username, password = str(form.get("username", "")), str(form.get("password", ""))
        next_page = _safe_next(str(form.get("next", "")))
        given, expected = (
            str(form.get(LOGIN_CSRF_FIELD, "")),
            request.cookies.get(LOGIN_CSRF_COOKIE),
        )
        if (
            not given
            or not expected
            or not secrets.compare_digest(given.encode(), expected.encode())
        ):
            # Not a failed attempt (the password was not even looked at): no throttle.
            error = "This login form has expired or came from another site: log in again here."
            return _login_page(ctx, request, next_page, error, status=403)
        try:
            operator = await ctx.log_in(username.strip(), password)
        except AdminError as exc:
            status = 429 if exc.code == "too_many_attempts" else 401
            return _login_page(ctx, request, next_page, exc.reason, status=status)
        hours = ctx.settings.admin_session_hours
        session = await create_session(ctx.pool, operator, timedelta(hours=hours), "cookie")
        await record(ctx.pool, operator.username, "login", operator.username, {"kind": "cookie"})
        response = RedirectResponse(next_page, status_code=303)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        response.set_cookie(
            COOKIE_NAME,
            session.token,
            max_age=int(hours * 3600),
            httponly=True,
            samesite="strict",
            secure=ctx.settings.admin_secure_cookie,
            path="/",
        )
        return response

    async def logout(request: Request) -> Response:
        session = await session_of(ctx, request)
        if session is not None:
            form = await request.form()
            given = str(form.get(CSRF_FIELD, ""))
            if not secrets.compare_digest(given.encode(), session.csrf.encode()):
                raise AdminError(
                    "the logout form carries the page's CSRF token",
                    field=CSRF_FIELD,
                    code="csrf_failed",
                )
            await delete_session(ctx.pool, session.token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/")
        return response

    async def home(request: Request) -> Response:
        return RedirectResponse("/fleet", status_code=303)

    return [
        Route("/", home, methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        page_route(ctx, "/fleet", fleet),
        page_route(ctx, "/documents", documents),
        page_route(ctx, "/documents/{register_id}/{seq}", document),
        page_route(ctx, "/syncs", syncs),
        page_route(ctx, "/dead-letters", dead_letter_list),
        page_route(ctx, "/dead-letters/{letter_id}", dead_letter),
        page_route(ctx, "/queues", queues),
        page_route(ctx, "/catalog", catalog),
        page_route(ctx, "/live", live),
        page_route(ctx, "/operators", operators, role="administrator"),
    ]
