"""Query-string input of the admin API: checked integers, dates, choices, and the opaque
cursors of keyset pagination. Bad input raises ``invalid_value`` naming the parameter."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from starlette.datastructures import QueryParams

from tillsync_protocol import InvalidValueError

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "choice_param",
    "date_param",
    "decode_cursor",
    "encode_cursor",
    "int_param",
    "limit_param",
    "text_param",
]

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def text_param(params: QueryParams, name: str) -> str | None:
    value = params.get(name, "").strip()
    return value or None


def int_param(params: QueryParams, name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidValueError(f"{name} must be an integer, not {raw!r}", field=name) from None
    if not low <= value <= high:
        raise InvalidValueError(f"{name} must be between {low} and {high}", field=name)
    return value


def limit_param(params: QueryParams) -> int:
    return int_param(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)


def choice_param(params: QueryParams, name: str, choices: Sequence[str]) -> str | None:
    value = text_param(params, name)
    if value is not None and value not in choices:
        raise InvalidValueError(f"{name} is one of {', '.join(choices)}", field=name)
    return value


def date_param(params: QueryParams, name: str, *, end: bool = False) -> datetime | None:
    """A ``YYYY-MM-DD`` day as a UTC instant: its start, or (``end``) the next day's."""
    raw = text_param(params, name)
    if raw is None:
        return None
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise InvalidValueError(f"{name} is a date YYYY-MM-DD, not {raw!r}", field=name) from None
    instant = datetime.combine(day, time(), tzinfo=UTC)
    return instant + timedelta(days=1) if end else instant


def encode_cursor(values: Sequence[Any]) -> str:
    """An opaque cursor for the next page, from the last row's sort key."""
    text = json.dumps(list(values), separators=(",", ":"), default=_iso)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(params: QueryParams, size: int) -> list[Any] | None:
    raw = text_param(params, "cursor")
    if raw is None:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        values = None
    if not isinstance(values, list) or len(values) != size:
        raise InvalidValueError("cursor is not one this API gave", field="cursor")
    return values


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)
