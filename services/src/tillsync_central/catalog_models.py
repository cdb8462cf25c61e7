"""What a valid state of each catalog entity is: one strict pydantic model per entity.

Strict types (no ``"12"`` for an integer, no float anywhere), unknown fields refused,
money as integer minor units beside a currency code, quantities as integer thousandths,
exchange rates as decimal strings. :func:`validate_state` turns an incoming state into
its canonical form (every field present, defaults filled), which is what is stored,
published and compared. ``docs/catalog.md`` lists the fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic import ValidationError as PydanticValidationError

from tillsync_protocol import ENTITIES, InvalidValueError, TillsyncError, field_path
from tillsync_protocol.money import (
    Amount,
    BasisPoints,
    Currency,
    DecimalRate,
    EntityId,
    NonNegativeAmount,
    QuantityMilli,
    Text,
    UnixMillis,
    WireId,
)

__all__ = [
    "ENTITY_MODELS",
    "MAX_STATE_BYTES",
    "EntityModel",
    "validate_key",
    "validate_state",
]

MAX_STATE_BYTES = 64 * 1024
"""Largest encoded state of one row: a change must fit in one message, and many in a page."""

Name = Annotated[StrictStr, Field(min_length=1, max_length=200)]
Ids = Annotated[list[EntityId], Field(max_length=200)]
Lines = Annotated[list[Annotated[StrictStr, Field(max_length=200)]], Field(max_length=50)]
Points = Annotated[StrictInt, Field(ge=0, le=10**12)]
_WIRE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class EntityModel(BaseModel):
    """Base of every entity state: strict, closed, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Item(EntityModel):
    """An article for sale. ``gross_price`` includes tax; a center's ``prices`` row with
    the same key overrides it there."""

    name: Name
    gross_price: Amount
    currency: Currency
    tax_rate_id: EntityId
    category_id: EntityId | None = None
    barcodes: Annotated[list[EntityId], Field(max_length=50)] = []
    labels: Annotated[list[EntityId], Field(max_length=50)] = []
    active: StrictBool = True


class Price(EntityModel):
    """A center's own price of an item (key: the item id)."""

    gross_price: Amount
    currency: Currency
    valid_from: UnixMillis | None = None
    valid_to: UnixMillis | None = None


class Category(EntityModel):
    name: Name
    parent_id: EntityId | None = None
    sort_order: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 0
    active: StrictBool = True


class Tax(EntityModel):
    """A tax rate; ``rate_bp`` in hundredths of a percent (2100 is 21 %)."""

    name: Name
    rate_bp: BasisPoints
    active: StrictBool = True


class PaymentMethod(EntityModel):
    name: Name
    kind: Literal["cash", "card", "voucher", "foreign_cash", "transfer", "other"]
    currency: Currency | None = None
    opens_drawer: StrictBool = False
    active: StrictBool = True


class Employee(EntityModel):
    """A person who may log in to registers; ``pin_hash`` is never a clear PIN."""

    name: Name
    role: Literal["cashier", "supervisor", "manager"] = "cashier"
    pin_hash: Annotated[StrictStr, Field(max_length=200)] | None = None
    active: StrictBool = True


class Customer(EntityModel):
    name: Name
    card_no: EntityId | None = None
    email: Annotated[StrictStr, Field(max_length=200)] | None = None
    phone: Annotated[StrictStr, Field(max_length=50)] | None = None
    tax_id: Annotated[StrictStr, Field(max_length=50)] | None = None
    discount_bp: BasisPoints = 0
    active: StrictBool = True


class LoyaltyBalance(EntityModel):
    """A customer's points (key: the customer id)."""

    points: Points
    tier: EntityId | None = None


class ExchangeRate(EntityModel):
    """``rate`` units of ``base_currency`` per one unit of ``currency`` (key: usually the
    currency code)."""

    currency: Currency
    base_currency: Currency
    rate: DecimalRate
    valid_from: UnixMillis | None = None


class Center(EntityModel):
    """A store; upserting one (global scope only) also creates its scope."""

    name: Name
    currency: Currency
    address: Text | None = None
    timezone: Annotated[StrictStr, Field(max_length=64)] | None = None


class RegisterEntry(EntityModel):
    """A register as registers see it (enrollment itself is ``registers add``)."""

    name: Name
    center_id: WireId
    labels: Annotated[list[EntityId], Field(max_length=50)] = []
    active: StrictBool = True


class Setting(EntityModel):
    """One named setting (key: its name)."""

    value: StrictStr | StrictInt | StrictBool | None
    description: Text = ""


class ReceiptLayout(EntityModel):
    name: Name
    width_chars: Annotated[StrictInt, Field(ge=16, le=120)] = 42
    header: Lines = []
    footer: Lines = []
    show_tax_summary: StrictBool = True


class CommercialRule(EntityModel):
    """A promotion. ``percent`` needs ``discount_bp``; ``amount`` and ``fixed_price`` need
    ``amount`` and ``currency``; ``buy_x_get_y`` needs ``buy_qty`` and ``get_qty``."""

    name: Name
    kind: Literal["percent", "amount", "fixed_price", "buy_x_get_y"]
    item_ids: Ids = []
    category_ids: Ids = []
    discount_bp: BasisPoints | None = None
    amount: NonNegativeAmount | None = None
    currency: Currency | None = None
    buy_qty: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    get_qty: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    valid_from: UnixMillis | None = None
    valid_to: UnixMillis | None = None
    active: StrictBool = True

    @model_validator(mode="after")
    def _complete(self) -> CommercialRule:
        needs = {
            "percent": ("discount_bp",),
            "amount": ("amount", "currency"),
            "fixed_price": ("amount", "currency"),
            "buy_x_get_y": ("buy_qty", "get_qty"),
        }[self.kind]
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} rule needs {' and '.join(missing)}")
        if (
            self.valid_from is not None
            and self.valid_to is not None
            and (self.valid_to < self.valid_from)
        ):
            raise ValueError("valid_to is before valid_from")
        return self


class KitComponent(EntityModel):
    item_id: EntityId
    qty_milli: Annotated[StrictInt, Field(ge=1, le=10**12)]


class Kit(EntityModel):
    """A bundle sold as one item (key: the kit's item id)."""

    name: Name
    components: Annotated[list[KitComponent], Field(min_length=1, max_length=100)]
    gross_price: Amount | None = None
    currency: Currency | None = None

    @model_validator(mode="after")
    def _priced(self) -> Kit:
        if (self.gross_price is None) != (self.currency is None):
            raise ValueError("gross_price and currency go together")
        return self


class StockLevel(EntityModel):
    """Stock of an item in a center (key: the item id), in thousandths."""

    qty_milli: QuantityMilli
    min_qty_milli: QuantityMilli | None = None


ENTITY_MODELS: dict[str, type[EntityModel]] = {
    "centers": Center,
    "registers": RegisterEntry,
    "items": Item,
    "categories": Category,
    "prices": Price,
    "taxes": Tax,
    "payment_methods": PaymentMethod,
    "employees": Employee,
    "customers": Customer,
    "loyalty_balances": LoyaltyBalance,
    "exchange_rates": ExchangeRate,
    "settings": Setting,
    "receipt_layouts": ReceiptLayout,
    "commercial_rules": CommercialRule,
    "kits": Kit,
    "stock_levels": StockLevel,
}
assert set(ENTITY_MODELS) == set(ENTITIES)  # every entity of the protocol has a model

_ERROR_CODES = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "int_type": "wrong_type",
    "string_type": "wrong_type",
    "bool_type": "wrong_type",
    "list_type": "wrong_type",
    "dict_type": "wrong_type",
    "model_type": "wrong_type",
    "model_attributes_type": "wrong_type",
    "greater_than_equal": "out_of_range",
    "less_than_equal": "out_of_range",
    "too_short": "out_of_range",
    "too_long": "out_of_range",
    "string_too_short": "out_of_range",
    "string_too_long": "out_of_range",
}


def _check_entity(entity: str) -> type[EntityModel]:
    model = ENTITY_MODELS.get(entity)
    if model is None:
        raise InvalidValueError(
            f"{entity!r} is not a catalog entity (one of {', '.join(ENTITIES)})",
            field="entity",
        )
    return model


def validate_key(entity: str, key: object) -> str:
    """The key, checked: 1 to 64 characters; a center's key is also a valid center id."""
    _check_entity(entity)
    if not isinstance(key, str) or not 1 <= len(key) <= 64:
        raise InvalidValueError("a key is a string of 1 to 64 characters", field="key")
    if entity == "centers" and not _is_wire_id(key):
        raise InvalidValueError(
            f"{key!r} is not a valid center id: lowercase letters, digits and '-'", field="key"
        )
    return key


def _is_wire_id(value: str) -> bool:
    return _WIRE_ID.fullmatch(value) is not None


def _float_path(value: object, path: str) -> str | None:
    """The path of the first float inside ``value``, if any."""
    if isinstance(value, float):
        return path
    if isinstance(value, dict):
        items: list[tuple[str, object]] = [(f"{path}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for sub_path, sub in items:
        found = _float_path(sub, sub_path)
        if found is not None:
            return found
    return None


def validate_state(entity: str, state: object) -> dict[str, Any]:
    """The canonical state of ``entity`` (defaults filled), or a :class:`TillsyncError`
    with code, field (``state.<path>``) and reason."""
    model = _check_entity(entity)
    if not isinstance(state, dict):
        raise TillsyncError("a state is a map of fields", field="state", code="wrong_type")
    floating = _float_path(state, "state")
    if floating is not None:
        raise TillsyncError(
            "no float anywhere: money is integer minor units, quantities integer "
            "thousandths, rates decimal strings",
            field=floating,
            code="float_not_allowed",
        )
    try:
        canonical = model.model_validate(state).model_dump(mode="json")
    except PydanticValidationError as exc:
        error = exc.errors()[0]
        path = field_path(tuple(error["loc"]))
        field = f"state.{path}" if path else "state"
        code = _ERROR_CODES.get(error["type"], "invalid_value")
        reason = error["msg"].removeprefix("Value error, ")
        raise TillsyncError(reason, field=field, code=code) from None
    size = len(msgpack.packb(canonical, use_bin_type=True))
    if size > MAX_STATE_BYTES:
        raise TillsyncError(
            f"the state takes {size} bytes encoded, more than {MAX_STATE_BYTES}",
            field="state",
            code="too_large",
        )
    return canonical
