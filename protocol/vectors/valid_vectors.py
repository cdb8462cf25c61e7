"""The valid golden vectors of protocol v1: realistic messages of every type.

Everything is fixed (uuids, timestamps, amounts) so that ``generate.py`` rewrites the
files byte for byte.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack

from tillsync_protocol import (
    Ack,
    AckBody,
    CashMovement,
    CashMovementBody,
    CatalogChange,
    CatalogChangeBody,
    DeltaEnd,
    DeltaEndBody,
    DeltaPage,
    DeltaPageBody,
    DeltaRequest,
    DeltaRequestBody,
    Discount,
    ForeignTender,
    Heartbeat,
    HeartbeatBody,
    ItemChanges,
    ItemEdit,
    ItemEditBody,
    LoyaltyAccrual,
    LoyaltyAccrualBody,
    LoyaltyRedemption,
    LoyaltyRedemptionBody,
    Message,
    Payment,
    PaymentTotal,
    Receipt,
    ReceiptBody,
    ReceiptLine,
    Refund,
    RefundBody,
    Reinit,
    ReinitBody,
    Rejection,
    ResendRequest,
    ResendRequestBody,
    SeqRange,
    ShiftClose,
    ShiftCloseBody,
    ShiftOpen,
    ShiftOpenBody,
    SyncSummary,
    TaxSummary,
    Void,
    VoidBody,
    encode,
)

T0 = 1_767_258_000_000
"""2026-01-01T09:00:00Z in Unix milliseconds: every vector's clock starts here."""
CENTER = "praha-1"
REGISTER = "praha-1-r01"


def uid(label: str) -> str:
    """A fixed uuid per label, so vectors never change between runs."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://tillsync.example/vectors/{label}"))


def at(minutes: int) -> int:
    return T0 + minutes * 60_000


@dataclass(frozen=True)
class ValidCase:
    name: str
    description: str
    data: bytes
    canonical: bool = True


def _doc(seq: int, minutes: int, label: str) -> dict[str, Any]:
    return {
        "created_at": at(minutes),
        "doc_id": uid(label),
        "register_id": REGISTER,
        "center_id": CENTER,
        "seq": seq,
    }


def ctl(minutes: int, label: str) -> dict[str, Any]:
    return {"created_at": at(minutes), "msg_id": uid(label)}


# A Czech receipt: gross prices in haléře, 21 % VAT on goods, 12 % on food.
CZK_LINES = [
    ReceiptLine(
        line_no=1,
        item_id="8594001234567",
        name="Káva zrnková 250 g",
        qty_milli=2000,
        unit_price=18_990,
        tax_rate_id="cz-21",
        tax_rate_bp=2100,
        total=37_980,
    ),
    ReceiptLine(
        line_no=2,
        item_id="2000000012345",
        name="Rohlík tukový",
        qty_milli=6000,
        unit_price=390,
        tax_rate_id="cz-12",
        tax_rate_bp=1200,
        total=2_340,
    ),
    ReceiptLine(
        line_no=3,
        item_id="2300012500001",
        name="Eidam 30 % (váha)",
        qty_milli=350,
        unit_price=21_900,
        discount=500,
        tax_rate_id="cz-12",
        tax_rate_bp=1200,
        total=7_165,
    ),
]
CZK_TAXES = [
    TaxSummary(tax_rate_id="cz-21", rate_bp=2100, base=31_388, tax=6_592),
    TaxSummary(tax_rate_id="cz-12", rate_bp=1200, base=8_486, tax=1_019),
]


def receipt_czk() -> Receipt:
    return Receipt(
        **_doc(41, 5, "receipt-czk"),
        body=ReceiptBody(
            receipt_no="P1-2026-000041",
            shift_no=7,
            employee_id="emp-novakova",
            currency="CZK",
            lines=CZK_LINES,
            discounts=[Discount(reason="Sleva na sýr 5 Kč", amount=500, line_no=3)],
            taxes=CZK_TAXES,
            payments=[Payment(method_id="cash", amount=47_485)],
            total=47_485,
        ),
    )


def valid_documents() -> list[tuple[str, str, Message]]:
    receipt = receipt_czk()
    eur = Receipt(
        **_doc(42, 9, "receipt-eur"),
        body=ReceiptBody(
            receipt_no="P1-2026-000042",
            shift_no=7,
            employee_id="emp-novakova",
            currency="CZK",
            lines=[CZK_LINES[0]],
            taxes=[TaxSummary(tax_rate_id="cz-21", rate_bp=2100, base=31_388, tax=6_592)],
            payments=[
                Payment(
                    method_id="foreign-eur",
                    amount=37_688,
                    foreign=ForeignTender(currency="EUR", amount=1_500, rate="25.125"),
                ),
                Payment(method_id="cash", amount=292),
            ],
            total=37_980,
            customer_id="cust-000981",
        ),
    )
    minimal = Receipt(
        **_doc(43, 12, "receipt-minimal"),
        body=ReceiptBody(
            receipt_no="P1-2026-000043",
            shift_no=7,
            employee_id="emp-novakova",
            currency="CZK",
            lines=[CZK_LINES[1]],
            payments=[Payment(method_id="card", amount=2_340)],
            total=2_340,
        ),
    )
    refund = Refund(
        **_doc(44, 20, "refund-czk"),
        body=RefundBody(
            receipt_no="R1-2026-000003",
            shift_no=7,
            employee_id="emp-novakova",
            currency="CZK",
            lines=[CZK_LINES[0].model_copy(update={"qty_milli": -1000, "total": -18_990})],
            taxes=[TaxSummary(tax_rate_id="cz-21", rate_bp=2100, base=-15_694, tax=-3_296)],
            payments=[Payment(method_id="cash", amount=-18_990)],
            total=-18_990,
            original_doc_id=receipt.doc_id,
            original_receipt_no=receipt.body.receipt_no,
            reason="Poškozený obal",
        ),
    )
    refund_no_original = Refund(
        **_doc(45, 24, "refund-no-original"),
        body=RefundBody(
            receipt_no="R1-2026-000004",
            shift_no=7,
            employee_id="emp-dvorak",
            currency="CZK",
            lines=[CZK_LINES[1].model_copy(update={"qty_milli": -2000, "total": -780})],
            payments=[Payment(method_id="cash", amount=-780)],
            total=-780,
            reason="Účtenka ztracena, vráceno dle vedoucí",
        ),
    )
    void = Void(
        **_doc(46, 26, "void"),
        body=VoidBody(
            voided_doc_id=uid("receipt-minimal"),
            voided_receipt_no="P1-2026-000043",
            shift_no=7,
            employee_id="emp-dvorak",
            reason="Zákazník si to rozmyslel",
        ),
    )
    shift_open = ShiftOpen(
        **_doc(40, 0, "shift-open"),
        body=ShiftOpenBody(
            shift_no=7, employee_id="emp-novakova", currency="CZK", opening_float=500_000
        ),
    )
    cash_in = CashMovement(
        **_doc(47, 30, "cash-in"),
        body=CashMovementBody(
            shift_no=7,
            employee_id="emp-novakova",
            currency="CZK",
            direction="in",
            amount=200_000,
            reason="Doplnění drobných",
        ),
    )
    cash_out = CashMovement(
        **_doc(48, 400, "cash-out"),
        body=CashMovementBody(
            shift_no=7,
            employee_id="emp-novakova",
            currency="CZK",
            direction="out",
            amount=1_000_000,
            reason="Odvod do trezoru",
        ),
    )
    accrual = LoyaltyAccrual(
        **_doc(49, 10, "loyalty-accrual"),
        body=LoyaltyAccrualBody(
            customer_id="cust-000981", points=37, receipt_doc_id=uid("receipt-eur")
        ),
    )
    redemption = LoyaltyRedemption(
        **_doc(50, 11, "loyalty-redemption"),
        body=LoyaltyRedemptionBody(
            customer_id="cust-000981", points=500, currency="CZK", amount=5_000
        ),
    )
    price_edit = ItemEdit(
        **_doc(51, 60, "item-edit-price"),
        body=ItemEditBody(
            item_id="8594001234567",
            base_version=12,
            changes=ItemChanges(gross_price=19_990, currency="CZK"),
        ),
    )
    codes_edit = ItemEdit(
        **_doc(52, 61, "item-edit-codes"),
        body=ItemEditBody(
            item_id="2000000012345",
            base_version=3,
            changes=ItemChanges(
                name="Rohlík tukový 43 g",
                barcodes=["2000000012345", "8590000000017"],
                labels=["pekarna", "praha"],
                active=True,
            ),
        ),
    )
    z_report = ShiftClose(
        **_doc(53, 480, "shift-close"),
        body=ShiftCloseBody(
            shift_no=7,
            z_number=7,
            employee_id="emp-novakova",
            currency="CZK",
            first_seq=40,
            last_seq=52,
            receipt_count=3,
            refund_count=2,
            void_count=1,
            gross_sales=87_805,
            refunds_total=-19_770,
            net_total=68_035,
            payments=[
                PaymentTotal(method_id="cash", count=4, amount=28_017),
                PaymentTotal(method_id="card", count=1, amount=2_340),
                PaymentTotal(method_id="foreign-eur", count=1, amount=37_688),
            ],
            taxes=[
                TaxSummary(tax_rate_id="cz-21", rate_bp=2100, base=47_082, tax=9_888),
                TaxSummary(tax_rate_id="cz-12", rate_bp=1200, base=9_789, tax=1_176),
            ],
            cash_expected=500_000 + 200_000 - 1_000_000 + 28_017 + 1_000_000,
            cash_counted=728_000,
        ),
    )
    return [
        (
            "receipt_czk_vat",
            "Czech receipt in CZK: 21 % and 12 % VAT lines, a line discount, cash",
            receipt,
        ),
        (
            "receipt_eur_foreign_tender",
            "Receipt paid partly in EUR at rate 25.125, rest in CZK cash; with a customer",
            eur,
        ),
        ("receipt_minimal", "Receipt with every optional list empty and customer_id nil", minimal),
        (
            "refund_with_original",
            "Refund of one line of a known receipt (negative amounts)",
            refund,
        ),
        (
            "refund_without_original",
            "Refund with no original document (original_* nil)",
            refund_no_original,
        ),
        ("void", "Void of a receipt by doc_id and receipt number", void),
        ("shift_open", "Shift 7 opened with a 5 000 Kč float", shift_open),
        (
            "shift_close_z_report",
            "Z-report of shift 7: counts, totals, payments and VAT per rate",
            z_report,
        ),
        ("cash_movement_in", "Cash put into the drawer", cash_in),
        ("cash_movement_out", "Cash taken to the safe", cash_out),
        ("loyalty_accrual", "Points earned on a receipt", accrual),
        ("loyalty_redemption", "Points redeemed for a 50 Kč discount, no receipt link", redemption),
        (
            "item_edit_price",
            "Price change made on the register, based on item version 12",
            price_edit,
        ),
        (
            "item_edit_codes",
            "Name, barcodes, labels and active flag changed on the register",
            codes_edit,
        ),
    ]


def valid_controls() -> list[tuple[str, str, Message]]:
    ack = Ack(
        **ctl(6, "ack-ranges"),
        body=AckBody(
            register_id=REGISTER,
            accepted=[SeqRange(first=40, last=44), SeqRange(first=46, last=52)],
        ),
    )
    ack_rejected = Ack(
        **ctl(7, "ack-rejected"),
        body=AckBody(
            register_id=REGISTER,
            accepted=[SeqRange(first=53, last=53)],
            rejected=[
                Rejection(
                    seq=45,
                    doc_id=uid("refund-no-original"),
                    code="conflict",
                    reason="seq 45 was already stored with different content",
                ),
                Rejection(
                    seq=54,
                    code="out_of_range",
                    field="body.lines[0].tax_rate_bp",
                    reason="Input should be less than or equal to 100000",
                ),
            ],
        ),
    )
    heartbeat = Heartbeat(
        **ctl(8, "heartbeat-full"),
        body=HeartbeatBody(
            register_id=REGISTER,
            center_id=CENTER,
            agent_version="1.0.0",
            pending=2,
            rejected=1,
            acknowledged=51,
            last_seq=53,
            cursors={"global": 1204, CENTER: 388},
            last_sync=SyncSummary(
                kind="documents",
                result="partially_successful",
                started_at=at(7),
                finished_at=at(7) + 850,
                sent=14,
                received=1,
                errors=1,
            ),
            last_error="seq 45 rejected: conflict",
        ),
    )
    heartbeat_min = Heartbeat(
        **ctl(9, "heartbeat-minimal"),
        body=HeartbeatBody(
            register_id="brno-2-r03",
            center_id="brno-2",
            agent_version="1.0.0",
            pending=0,
            rejected=0,
            acknowledged=0,
            last_seq=0,
        ),
    )
    item_state: dict[str, Any] = {
        "name": "Káva zrnková 250 g",
        "gross_price": 19_990,
        "currency": "CZK",
        "tax_rate_id": "cz-21",
        "barcodes": ["8594001234567"],
        "labels": [],
        "active": True,
        "supplier": None,
        "attributes": {"origin": "Brazílie", "roast": {"level": 3}},
    }
    change = CatalogChangeBody(
        scope="global",
        scope_seq=1205,
        entity="items",
        key="8594001234567",
        op="upsert",
        version=13,
        state=item_state,
    )
    delete = CatalogChangeBody(
        scope=CENTER, scope_seq=389, entity="prices", key="p-8594001234567", op="delete", version=4
    )
    request_id = uid("delta-request")
    return [
        ("ack_ranges", "Ack of two cumulative seq ranges (45 still pending)", ack),
        ("ack_with_rejections", "Ack with a conflict and a validation rejection", ack_rejected),
        ("heartbeat_full", "Heartbeat with cursors, last sync summary and last error", heartbeat),
        ("heartbeat_minimal", "Heartbeat of a fresh register: defaults and nils", heartbeat_min),
        (
            "catalog_change_upsert",
            "Item upsert in the global scope with a nested state",
            CatalogChange(**ctl(61, "cat-upsert"), body=change),
        ),
        (
            "catalog_change_delete",
            "Price delete in a center scope: state is nil",
            CatalogChange(**ctl(62, "cat-delete"), body=delete),
        ),
        (
            "delta_request",
            "Delta request from the register's cursors",
            DeltaRequest(
                **ctl(63, "delta-req"),
                body=DeltaRequestBody(
                    request_id=request_id,
                    register_id=REGISTER,
                    center_id=CENTER,
                    cursors={"global": 1204, CENTER: 388},
                ),
            ),
        ),
        (
            "delta_request_snapshot",
            "Snapshot of chosen entities without customers",
            DeltaRequest(
                **ctl(64, "delta-req-snapshot"),
                body=DeltaRequestBody(
                    request_id=uid("delta-request-snapshot"),
                    register_id=REGISTER,
                    center_id=CENTER,
                    mode="snapshot",
                    entities=["items", "prices", "taxes"],
                    with_customers=False,
                    page_size=500,
                ),
            ),
        ),
        (
            "delta_page",
            "First page of a delta reply",
            DeltaPage(
                **ctl(65, "delta-page"),
                body=DeltaPageBody(request_id=request_id, page_no=1, changes=[change, delete]),
            ),
        ),
        (
            "delta_end",
            "End of a delta reply with the new cursors",
            DeltaEnd(
                **ctl(66, "delta-end"),
                body=DeltaEndBody(
                    request_id=request_id, pages=1, changes=2, cursors={"global": 1205, CENTER: 389}
                ),
            ),
        ),
        (
            "delta_end_error",
            "A delta reply that failed: error code and reason",
            DeltaEnd(
                **ctl(67, "delta-end-error"),
                body=DeltaEndBody(
                    request_id=uid("delta-request-failed"),
                    pages=0,
                    changes=0,
                    cursors={},
                    error_code="unknown_register",
                    error_reason="register praha-1-r99 is not provisioned",
                ),
            ),
        ),
        (
            "reinit_replace",
            "Command: replace the whole catalog, without customers",
            Reinit(
                **ctl(70, "reinit"),
                body=ReinitBody(
                    command_id=uid("reinit-command"),
                    mode="replace",
                    with_customers=False,
                    requested_by="op-admin",
                ),
            ),
        ),
        (
            "resend_request",
            "Central found a hole and asks for seqs 45 to 45 again",
            ResendRequest(
                **ctl(71, "resend"),
                body=ResendRequestBody(
                    register_id=REGISTER, from_seq=45, to_seq=45, reason="hole in seq after 44"
                ),
            ),
        ),
    ]


def pack(raw: object) -> bytes:
    return msgpack.packb(raw, use_bin_type=True)  # type: ignore[no-any-return]


def raw_of(message: Message) -> dict[str, Any]:
    return copy.deepcopy(message.model_dump(mode="python"))


def _forward_compat() -> list[ValidCase]:
    newer = raw_of(receipt_czk())
    newer["v"] = [1, 7]
    # Unknown fields from a newer minor: at the top, in the body and inside a line.
    newer["trace_id"] = "4bf92f3577b34da6"
    newer["body"]["fiscal"] = {"fik": "b3a1-77f0", "bkp": "01234567-89abcdef"}
    newer["body"]["lines"][0]["promo_id"] = "promo-2026-01"
    reordered = raw_of(receipt_czk())
    reordered = dict(reversed(list(reordered.items())))
    omitted = raw_of(receipt_czk())
    del omitted["body"]["customer_id"], omitted["body"]["lines"][0]["discount"]
    return [
        ValidCase(
            "forward_compat_minor_7",
            "A [1,7] receipt with unknown fields at three levels: a 1.0 reader drops them",
            pack(newer),
            canonical=False,
        ),
        ValidCase(
            "non_canonical_field_order",
            "Fields in reverse order: readers accept any order, writers use declaration order",
            pack(reordered),
            canonical=False,
        ),
        ValidCase(
            "omitted_optional_fields",
            "Optional fields absent (not nil): read as their defaults",
            pack(omitted),
            canonical=False,
        ),
    ]


def valid_cases() -> list[ValidCase]:
    made = [
        ValidCase(name, description, encode(message))
        for name, description, message in [*valid_documents(), *valid_controls()]
    ]
    return [*made, *_forward_compat()]
