"""Jinja filters of the dashboard: money from integer minor units (never a float), times,
hex dumps and JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

__all__ = ["FILTERS", "format_money", "format_time"]

# ISO 4217 minor-unit exponents that are not 2.
_EXPONENTS = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0,
    "PYG": 0, "RWF": 0, "UGX": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
}  # fmt: skip


def format_money(minor: int | None, currency: str | None = None) -> str:
    """``123456, "CZK"`` → ``1 234.56 CZK``, by integer arithmetic only."""
    if minor is None:
        return ""
    exponent = _EXPONENTS.get(currency or "", 2)
    sign = "-" if minor < 0 else ""
    whole, fraction = divmod(abs(int(minor)), 10**exponent)
    text = f"{whole:,}".replace(",", "\u202f")
    if exponent:
        text += f".{fraction:0{exponent}d}"
    return f"{sign}{text}" + (f" {currency}" if currency else "")


def format_time(value: str | datetime | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _hex_lines(value: str, width: int = 64) -> str:
    return "\n".join(value[i : i + width] for i in range(0, len(value), width))


def _pretty_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)


FILTERS: dict[str, Callable[..., str]] = {
    "money": format_money,
    "when": format_time,
    "hexlines": _hex_lines,
    "pretty": _pretty_json,
}
