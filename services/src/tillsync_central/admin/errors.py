"""The admin API's errors: one class with stable codes, each mapped to an HTTP status.

Every error answer is ``{"error": {"code", "field", "reason"}}`` (as the agent's local
API), with the codes of ``docs/errors.md``.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from tillsync_protocol import TillsyncError

__all__ = ["AdminError", "error_response", "status_of"]

_STATUS_OF_CODE = {
    "malformed": 400,
    "unauthorized": 401,
    "login_failed": 401,
    "forbidden": 403,
    "csrf_failed": 403,
    "not_found": 404,
    "unknown_register": 404,
    "unknown_operator": 404,
    "unknown_dead_letter": 404,
    "unknown_scope": 404,
    "method_not_allowed": 405,
    "operator_exists": 409,
    "already_settled": 409,
    "too_large": 413,
    "too_many_attempts": 429,
    "broker_management_error": 502,
}


class AdminError(TillsyncError):
    """A request the admin API refuses: ``unauthorized``, ``login_failed``,
    ``too_many_attempts`` (login throttled), ``forbidden`` (the role may not),
    ``csrf_failed``, ``not_found``, ``unknown_operator``, ``operator_exists``,
    ``unknown_dead_letter``, ``already_settled`` (a dead letter no longer ``new``)."""

    code = "admin_error"


def status_of(exc: TillsyncError) -> int:
    """The HTTP status of an error: by code, else 422 (input the request carried that
    central refuses: a protocol or catalog validation code)."""
    return _STATUS_OF_CODE.get(exc.code, 422)


def error_response(status: int, code: str, field: str, reason: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "field": field, "reason": reason}}, status)
