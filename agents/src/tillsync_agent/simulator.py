"""A simulated till: plausible documents for demos, load tests and benchmarks.

It opens a shift, sells receipts (and the odd refund, void and cash movement), and closes
the shift with a Z-report whose totals add up to what it sold, so central's reconciliation
has something true to check.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Till"]

_ITEMS = [
    ("item-rohlik", "Rohlík", 390, "vat-12", 1200),
    ("item-mleko", "Mléko 1 l", 2490, "vat-12", 1200),
    ("item-kava", "Káva zrnková 250 g", 18900, "vat-21", 2100),
    ("item-pivo", "Pivo 0,5 l", 3290, "vat-21", 2100),
    ("item-jablka", "Jablka (kg)", 4990, "vat-12", 1200),
    ("item-cokolada", "Čokoláda", 3990, "vat-21", 2100),
]


@dataclass
class Till:
    """Produces ``(doc_type, body)`` pairs; call :meth:`next_document` forever."""

    register_id: str
    seed: int = 0
    receipts_per_shift: int = 200
    shift_no: int = 0
    _rng: random.Random = field(init=False)
    _sold: list[tuple[str, int]] = field(default_factory=list, init=False)
    _open: bool = field(default=False, init=False)
    _counter: int = field(default=0, init=False)
    _next_seq: int = field(default=1, init=False)
    _shift_first_seq: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.register_id}:{self.seed}")

    def next_document(self) -> tuple[str, dict[str, Any]]:
        """The next document; assumes the caller stores every one (seqs are predicted)."""
        doc = self._next()
        self._next_seq += 1
        return doc

    def _next(self) -> tuple[str, dict[str, Any]]:
        if not self._open:
            self.shift_no += 1
            self._open = True
            self._sold = []
            self._shift_first_seq = self._next_seq
            return "shift_open", {
                "shift_no": self.shift_no,
                "employee_id": "emp-1",
                "currency": "CZK",
                "opening_float": 200_000,
            }
        if len(self._sold) >= self.receipts_per_shift:
            self._open = False
            return "shift_close", self._z_report()
        return "receipt", self._receipt()

    def _receipt(self) -> dict[str, Any]:
        self._counter += 1
        lines: list[dict[str, Any]] = []
        total = 0
        for line_no in range(1, self._rng.randint(1, 5) + 1):
            item_id, name, price, tax_id, rate = self._rng.choice(_ITEMS)
            qty_milli = self._rng.choice([1000, 1000, 2000, 3000])
            lines.append(
                {
                    "line_no": line_no,
                    "item_id": item_id,
                    "name": name,
                    "qty_milli": qty_milli,
                    "unit_price": price,
                    "tax_rate_id": tax_id,
                    "tax_rate_bp": rate,
                    "total": price * qty_milli // 1000,
                }
            )
            total += price * qty_milli // 1000
        method = self._rng.choice(["cash", "card", "card"])
        self._sold.append((method, total))
        return {
            "receipt_no": f"{self.register_id}-{self.shift_no}-{self._counter}",
            "shift_no": self.shift_no,
            "employee_id": "emp-1",
            "currency": "CZK",
            "lines": lines,
            "payments": [{"method_id": method, "amount": total}],
            "total": total,
        }

    def _z_report(self) -> dict[str, Any]:
        by_method: dict[str, list[int]] = {}
        for method, total in self._sold:
            by_method.setdefault(method, []).append(total)
        gross = sum(total for _, total in self._sold)
        cash = sum(by_method.get("cash", []))
        return {
            "shift_no": self.shift_no,
            "z_number": self.shift_no,
            "employee_id": "emp-1",
            "currency": "CZK",
            "first_seq": self._shift_first_seq,
            "last_seq": self._next_seq,
            "receipt_count": len(self._sold),
            "refund_count": 0,
            "void_count": 0,
            "gross_sales": gross,
            "refunds_total": 0,
            "net_total": gross,
            "payments": [
                {"method_id": m, "count": len(v), "amount": sum(v)}
                for m, v in sorted(by_method.items())
            ],
            "taxes": [],
            "cash_expected": 200_000 + cash,
            "cash_counted": 200_000 + cash,
        }
