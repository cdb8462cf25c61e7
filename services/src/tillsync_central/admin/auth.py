"""Who is asking, and may they: sessions from the cookie or a bearer token, the role each
endpoint needs, CSRF for cookie-authenticated writes, and the audit row of every write.

Every JSON endpoint is an :class:`Endpoint` in one table (``api.ENDPOINTS``) naming the
least role it needs; :func:`api_route` wraps its handler so that the check cannot be
forgotten, and a test walks the table. Writes (any method but GET) are audited by the
wrapper after the handler succeeds.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tillsync_protocol import MalformedError

from .audit import record
from .context import AdminContext
from .errors import AdminError
from .operators import Role, role_allows
from .sessions import COOKIE_NAME, Session, find_session

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "Endpoint",
    "Written",
    "api_route",
    "page_route",
    "read_json",
    "session_of",
]

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
MAX_BODY = 4 * 2**20
SAFE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Written:
    """What a write handler returns: the answer, and what the audit log keeps."""

    body: dict[str, Any]
    target: str
    details: dict[str, Any] = field(default_factory=dict)
    status: int = 200


Handler = Callable[[AdminContext, Request, Session], Awaitable[Response | Written]]


@dataclass(frozen=True)
class Endpoint:
    """One JSON endpoint: method, path, the least role it needs (``None``: open, as
    login), its audit action (writes) and its OpenAPI description."""

    method: str
    path: str
    handler: Handler
    role: Role | None
    summary: str
    action: str = ""
    query: tuple[str, ...] = ()
    body: dict[str, Any] | None = None
    tag: str = ""

    @property
    def writes(self) -> bool:
        return self.method not in SAFE_METHODS


async def session_of(ctx: AdminContext, request: Request) -> Session | None:
    """The session of a bearer token, else of the cookie; None when neither is valid."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return await find_session(ctx.pool, token.strip())
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie:
        session = await find_session(ctx.pool, cookie)
        return session if session is not None and session.kind == "cookie" else None
    return None


def check_csrf(session: Session, given: str | None) -> None:
    """A cookie-authenticated write must carry the session's CSRF token (a bearer token
    is never sent by a browser on its own, so it needs none)."""
    if session.kind != "cookie":
        return
    if not given or not secrets.compare_digest(given.encode(), session.csrf.encode()):
        raise AdminError(
            f"a write from the dashboard carries the page's {CSRF_HEADER} header",
            field=CSRF_HEADER,
            code="csrf_failed",
        )


def _require(session: Session | None, role: Role) -> Session:
    if session is None:
        raise AdminError(
            "log in: a session cookie or Authorization: Bearer <token>",
            field="Authorization",
            code="unauthorized",
        )
    if not role_allows(session.operator.role, role):
        raise AdminError(
            f"a {session.operator.role} may not do this (needs {role})",
            field="role",
            code="forbidden",
        )
    return session


async def read_json(request: Request, *, empty: Any = None) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise AdminError(f"a body has at most {MAX_BODY} bytes", code="too_large")
    if not body.strip():
        if empty is not None:
            return empty
        raise MalformedError("the body is empty: send JSON")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedError(f"the body is not JSON: {exc}") from None


def api_route(ctx: AdminContext, endpoint: Endpoint) -> Route:
    """The Starlette route of an endpoint, with its role, CSRF and audit checks."""

    async def guarded(request: Request) -> Response:
        session = await session_of(ctx, request)
        if endpoint.role is not None:
            session = _require(session, endpoint.role)
            if endpoint.writes:
                check_csrf(session, request.headers.get(CSRF_HEADER))
        result = await endpoint.handler(ctx, request, session)  # type: ignore[arg-type]
        if not isinstance(result, Written):
            return result
        if endpoint.writes and endpoint.action:
            username = session.operator.username if session else str(result.target)
            await record(ctx.pool, username, endpoint.action, result.target, result.details)
        return JSONResponse(result.body, result.status)

    return Route(endpoint.path, guarded, methods=[endpoint.method], name=endpoint.action or None)


PageHandler = Callable[[AdminContext, Request, Session], Awaitable[Response]]


def page_route(ctx: AdminContext, path: str, handler: PageHandler, role: Role = "viewer") -> Route:
    """An HTML page: without a session, a redirect to the login page; without the role, a
    403 page saying which role it needs (a person is reading, not a client)."""

    async def guarded(request: Request) -> Response:
        session = await session_of(ctx, request)
        if session is None:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        if not role_allows(session.operator.role, role):
            return ctx.templates.TemplateResponse(
                request,
                "forbidden.html",
                {"session": session, "page": "", "title": "Not for your role", "needed": role},
                status_code=403,
                headers={"Cache-Control": "no-store"},
            )
        return await handler(ctx, request, session)

    return Route(path, guarded, methods=["GET"])
