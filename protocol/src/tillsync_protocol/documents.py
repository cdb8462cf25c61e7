"""Documents: what registers produce and central keeps, exactly once."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator

from .envelope import Document, Model, require_ordered
from .money import (
    Amount,
    BasisPoints,
    Count,
    Currency,
    DecimalRate,
    EntityId,
    NonNegativeAmount,
    PositiveAmount,
    QuantityMilli,
    Seq,
    Text,
    Uuid,
)

__all__ = [
    "DOCUMENT_TYPES",
    "CashMovement",
    "CashMovementBody",
    "Discount",
    "ForeignTender",
    "ItemChanges",
    "ItemEdit",
    "ItemEditBody",
    "LoyaltyAccrual",
    "LoyaltyAccrualBody",
    "LoyaltyRedemption",
    "LoyaltyRedemptionBody",
    "Payment",
    "PaymentTotal",
    "Receipt",
    "ReceiptBody",
    "ReceiptLine",
    "Refund",
    "RefundBody",
    "ShiftClose",
    "ShiftCloseBody",
    "ShiftOpen",
    "ShiftOpenBody",
    "TaxSummary",
    "Void",
    "VoidBody",
]

ShiftNo = Annotated[StrictInt, Field(ge=1, le=2**31)]
LineNo = Annotated[StrictInt, Field(ge=1, le=10_000)]
Points = Annotated[StrictInt, Field(ge=1, le=10**12)]
# pydantic copies mutable defaults per instance and the models are frozen: the ``= []``
# defaults below are safe, hence their RUF012 exemptions.


class ReceiptLine(Model):
    line_no: LineNo
    item_id: EntityId
    name: Text
    qty_milli: QuantityMilli
    unit_price: Amount
    discount: NonNegativeAmount = 0
    tax_rate_id: EntityId
    tax_rate_bp: BasisPoints
    total: Amount


class Discount(Model):
    reason: Text
    amount: NonNegativeAmount
    line_no: LineNo | None = None


class TaxSummary(Model):
    tax_rate_id: EntityId
    rate_bp: BasisPoints
    base: Amount
    tax: Amount


class ForeignTender(Model):
    """A payment tendered in another currency, converted at ``rate``."""

    currency: Currency
    amount: Amount
    rate: DecimalRate


class Payment(Model):
    method_id: EntityId
    amount: Amount
    foreign: ForeignTender | None = None


class ReceiptBody(Model):
    receipt_no: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    shift_no: ShiftNo
    employee_id: EntityId
    currency: Currency
    lines: Annotated[list[ReceiptLine], Field(min_length=1, max_length=2000)]
    discounts: Annotated[list[Discount], Field(max_length=2000)] = []  # noqa: RUF012
    taxes: Annotated[list[TaxSummary], Field(max_length=100)] = []  # noqa: RUF012
    payments: Annotated[list[Payment], Field(min_length=1, max_length=100)]
    total: Amount
    customer_id: EntityId | None = None


class RefundBody(ReceiptBody):
    original_doc_id: Uuid | None = None
    original_receipt_no: Annotated[StrictStr, Field(max_length=64)] | None = None
    reason: Text


class VoidBody(Model):
    voided_doc_id: Uuid
    voided_receipt_no: Annotated[StrictStr, Field(max_length=64)]
    shift_no: ShiftNo
    employee_id: EntityId
    reason: Text


class ShiftOpenBody(Model):
    shift_no: ShiftNo
    employee_id: EntityId
    currency: Currency
    opening_float: NonNegativeAmount


class PaymentTotal(Model):
    method_id: EntityId
    count: Count
    amount: Amount


class ShiftCloseBody(Model):
    """The Z-report: what the register counted over one shift."""

    shift_no: ShiftNo
    z_number: Annotated[StrictInt, Field(ge=1, le=2**31)]
    employee_id: EntityId
    currency: Currency
    first_seq: Seq
    last_seq: Seq
    receipt_count: Count
    refund_count: Count
    void_count: Count
    gross_sales: Amount
    refunds_total: Amount
    net_total: Amount
    payments: Annotated[list[PaymentTotal], Field(max_length=100)]
    taxes: Annotated[list[TaxSummary], Field(max_length=100)]
    cash_expected: Amount
    cash_counted: Amount

    @model_validator(mode="after")
    def _ordered(self) -> ShiftCloseBody:
        require_ordered(self, "first_seq", "last_seq")
        return self


class CashMovementBody(Model):
    shift_no: ShiftNo
    employee_id: EntityId
    currency: Currency
    direction: Literal["in", "out"]
    amount: PositiveAmount
    reason: Text


class LoyaltyAccrualBody(Model):
    customer_id: EntityId
    points: Points
    receipt_doc_id: Uuid | None = None


class LoyaltyRedemptionBody(Model):
    customer_id: EntityId
    points: Points
    currency: Currency
    amount: NonNegativeAmount
    receipt_doc_id: Uuid | None = None


class ItemChanges(Model):
    """The fields an item edit may change; at least one must be set."""

    name: Text | None = None
    gross_price: Amount | None = None
    currency: Currency | None = None
    tax_rate_id: EntityId | None = None
    category_id: EntityId | None = None
    barcodes: Annotated[list[EntityId], Field(max_length=50)] | None = None
    labels: Annotated[list[EntityId], Field(max_length=50)] | None = None
    active: StrictBool | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> ItemChanges:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("an item edit must change at least one field")
        return self


class ItemEditBody(Model):
    item_id: EntityId
    base_version: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
    changes: ItemChanges


class Receipt(Document):
    type: Literal["receipt"] = "receipt"
    body: ReceiptBody


class Refund(Document):
    type: Literal["refund"] = "refund"
    body: RefundBody


class Void(Document):
    type: Literal["void"] = "void"
    body: VoidBody


class ShiftOpen(Document):
    type: Literal["shift_open"] = "shift_open"
    body: ShiftOpenBody


class ShiftClose(Document):
    type: Literal["shift_close"] = "shift_close"
    body: ShiftCloseBody


class CashMovement(Document):
    type: Literal["cash_movement"] = "cash_movement"
    body: CashMovementBody


class LoyaltyAccrual(Document):
    type: Literal["loyalty_accrual"] = "loyalty_accrual"
    body: LoyaltyAccrualBody


class LoyaltyRedemption(Document):
    type: Literal["loyalty_redemption"] = "loyalty_redemption"
    body: LoyaltyRedemptionBody


class ItemEdit(Document):
    type: Literal["item_edit"] = "item_edit"
    body: ItemEditBody


DOCUMENT_TYPES: dict[str, type[Document]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        Receipt,
        Refund,
        Void,
        ShiftOpen,
        ShiftClose,
        CashMovement,
        LoyaltyAccrual,
        LoyaltyRedemption,
        ItemEdit,
    )
}
