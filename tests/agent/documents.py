"""Sample document bodies for agent and end-to-end tests."""

from __future__ import annotations

from typing import Any


def receipt(total: int = 12_100, *, shift_no: int = 1, receipt_no: str = "R-1") -> dict[str, Any]:
    """A one-line CZK receipt paid in cash; ``total`` in haléře."""
    return {
        "receipt_no": receipt_no,
        "shift_no": shift_no,
        "employee_id": "emp-1",
        "currency": "CZK",
        "lines": [
            {
                "line_no": 1,
                "item_id": "item-42",
                "name": "Rohlík",
                "qty_milli": 1000,
                "unit_price": total,
                "tax_rate_id": "vat-21",
                "tax_rate_bp": 2100,
                "total": total,
            }
        ],
        "payments": [{"method_id": "cash", "amount": total}],
        "total": total,
    }


def shift_close(
    shift_no: int, first_seq: int, last_seq: int, count: int, total: int
) -> dict[str, Any]:
    return {
        "shift_no": shift_no,
        "z_number": shift_no,
        "employee_id": "emp-1",
        "currency": "CZK",
        "first_seq": first_seq,
        "last_seq": last_seq,
        "receipt_count": count,
        "refund_count": 0,
        "void_count": 0,
        "gross_sales": total,
        "refunds_total": 0,
        "net_total": total,
        "payments": [{"method_id": "cash", "count": count, "amount": total}],
        "taxes": [],
        "cash_expected": total,
        "cash_counted": total,
    }
