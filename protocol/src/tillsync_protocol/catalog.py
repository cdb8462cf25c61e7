"""Names of the catalog: the entities central owns and registers replicate, and scopes."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["CUSTOMER_ENTITIES", "ENTITIES", "GLOBAL_SCOPE", "EntityName", "is_center_scope"]

EntityName = Literal[
    "centers",
    "registers",
    "items",
    "categories",
    "prices",
    "taxes",
    "payment_methods",
    "employees",
    "customers",
    "loyalty_balances",
    "exchange_rates",
    "settings",
    "receipt_layouts",
    "commercial_rules",
    "kits",
    "stock_levels",
]

ENTITIES: tuple[str, ...] = get_args(EntityName)
"""Every catalog entity, in the order a full load applies them."""

CUSTOMER_ENTITIES: frozenset[str] = frozenset({"customers", "loyalty_balances"})
"""What a reinit "without customers" leaves out."""

GLOBAL_SCOPE = "global"
"""The scope of changes every register receives; any other scope is a center id."""


def is_center_scope(scope: str) -> bool:
    """True when ``scope`` names a center rather than the global scope."""
    return scope != GLOBAL_SCOPE
