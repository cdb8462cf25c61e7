"""The golden vectors of ``document_batch`` bodies: valid ones with the documents they
hold, invalid ones with the error a reader must report (``split_batch``)."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from valid_vectors import valid_cases

from tillsync_protocol import encode_batch


@dataclass(frozen=True)
class BatchCase:
    name: str
    description: str
    data: bytes
    documents: list[bytes] | None = None
    code: str | None = None
    field: str | None = None
    max_documents: int | None = None


def _documents(*names: str) -> list[bytes]:
    by_name = {case.name: case.data for case in valid_cases()}
    return [by_name[name] for name in names]


def batch_cases() -> list[BatchCase]:
    three = _documents("receipt_czk_vat", "refund_with_original", "shift_close_z_report")
    one = _documents("receipt_minimal")
    packed = msgpack.packb
    return [
        BatchCase(
            "three_documents",
            "A receipt, a refund and a Z-report of one register, in seq order.",
            encode_batch(three),
            documents=three,
        ),
        BatchCase("one_document", "A batch may hold one document.", encode_batch(one), one),
        BatchCase(
            "not_an_array",
            "A lone document (a map) where a batch is expected.",
            one[0],
            code="malformed",
            field="",
        ),
        BatchCase("empty", "An empty array.", packed([]), code="out_of_range", field=""),
        BatchCase(
            "too_many",
            "Three documents read with a limit of two.",
            encode_batch(three),
            code="out_of_range",
            field="",
            max_documents=2,
        ),
        BatchCase(
            "str_element",
            "The second element is a MessagePack str holding the document, not a bin.",
            packed([one[0], one[0].decode("latin-1")], use_bin_type=True),
            code="wrong_type",
            field="[1]",
        ),
        BatchCase(
            "empty_element",
            "An empty bin is no document.",
            packed([one[0], b""], use_bin_type=True),
            code="wrong_type",
            field="[1]",
        ),
        BatchCase(
            "truncated",
            "The array announces two documents and holds one.",
            encode_batch([one[0], one[0]])[: 1 + 3 + len(one[0])],
            code="malformed",
            field="",
        ),
        BatchCase(
            "trailing_bytes",
            "A valid batch followed by one more byte.",
            encode_batch(one) + b"\xc0",
            code="malformed",
            field="",
        ),
    ]
