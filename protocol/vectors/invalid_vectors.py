"""The invalid golden vectors of protocol v1, each with the error a decoder must report.

Most are one change to a valid message's map (so exactly one thing is wrong); the rest
are raw bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from valid_vectors import at, ctl, pack, raw_of, receipt_czk, valid_controls, valid_documents

from tillsync_protocol import CatalogChange, CatalogChangeBody, Message, Receipt, encode


@dataclass(frozen=True)
class InvalidCase:
    name: str
    description: str
    data: bytes
    code: str
    field: str
    max_size: int | None = None


def _mutated(
    message: Message, change: Callable[[dict[str, Any]], None]
) -> bytes:  # one change to a valid message's map
    raw = raw_of(message)
    change(raw)
    return pack(raw)


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        *parents, last = _parse(path)
        node: Any = raw
        for part in parents:
            node = node[part]
        node[last] = value

    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        *parents, last = _parse(path)
        node: Any = raw
        for part in parents:
            node = node[part]
        del node[last]

    return change


def _parse(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for chunk in path.split("."):
        name, _, rest = chunk.partition("[")
        if name:
            parts.append(name)
        if rest:
            parts.extend(int(index) for index in rest.rstrip("]").split("]["))
    return parts


def invalid_cases() -> list[InvalidCase]:
    receipt = receipt_czk()
    good = encode(receipt)
    cases = [*_malformed(good), *_envelope_errors(receipt)]
    field_errors: list[tuple[str, str, str, str, object]] = [
        # name, description, code, field, new value (_DELETE removes the field)
        ("missing_body_total", "body.total absent", "missing_field", "body.total", _DELETE),
        ("missing_seq", "A document without seq", "missing_field", "seq", _DELETE),
        (
            "missing_line_tax_rate",
            "A line without its tax rate",
            "missing_field",
            "body.lines[2].tax_rate_id",
            _DELETE,
        ),
        (
            "unknown_field_same_minor",
            "An unknown top-level field from a [1,0] writer",
            "unknown_field",
            "fiscal_code",
            "x",
        ),
        (
            "unknown_field_nested",
            "An unknown field inside a line from a [1,0] writer",
            "unknown_field",
            "body.lines[1].color",
            "red",
        ),
        ("wrong_type_seq_string", "seq as a string", "wrong_type", "seq", "41"),
        (
            "wrong_type_bool_for_int",
            "A boolean where an integer is required",
            "wrong_type",
            "body.lines[0].qty_milli",
            True,
        ),
        (
            "wrong_type_body_array",
            "body as an array instead of a map",
            "wrong_type",
            "body",
            [1, 2],
        ),
        (
            "wrong_type_binary_for_string",
            "Binary where a string is required",
            "wrong_type",
            "body.employee_id",
            b"emp-novakova",
        ),
        (
            "float_money",
            "Money as a float: 189.9 instead of 18990 haléřů",
            "float_not_allowed",
            "body.lines[3].unit_price",
            None,
        ),
        ("float_created_at", "A float timestamp", "float_not_allowed", "created_at", float(at(5))),
        ("out_of_range_seq_zero", "seq starts at 1", "out_of_range", "seq", 0),
        (
            "out_of_range_tax_rate",
            "A tax rate above 1000 %",
            "out_of_range",
            "body.lines[0].tax_rate_bp",
            100_001,
        ),
        ("out_of_range_no_lines", "A receipt with no lines", "out_of_range", "body.lines", []),
        (
            "out_of_range_amount",
            "A total beyond ±10^15 minor units",
            "out_of_range",
            "body.total",
            10**15 + 1,
        ),
        (
            "invalid_currency_lowercase",
            "Currency codes are three upper-case letters",
            "invalid_value",
            "body.currency",
            "czk",
        ),
        (
            "invalid_rate_comma",
            "A rate with a decimal comma",
            "invalid_value",
            "body.payments[0].foreign.rate",
            "25,125",
        ),
        (
            "invalid_doc_id",
            "doc_id is not a lower-case uuid",
            "invalid_value",
            "doc_id",
            "6F9619FF-8B86-D011-B42D-00C04FC964FF",
        ),
        (
            "invalid_register_id",
            "register_id with upper case and a dot",
            "invalid_value",
            "register_id",
            "Praha.1",
        ),
    ]
    for name, description, code, path, value in field_errors:
        change: Callable[[dict[str, Any]], None]
        if name == "float_money":
            # Four lines so that the path reads body.lines[3].unit_price.
            change = _float_fourth_line
        elif name == "invalid_rate_comma":
            change = _set(
                "body.payments[0].foreign", {"currency": "EUR", "amount": 100, "rate": "25,125"}
            )
        elif value is _DELETE:
            change = _delete(path)
        else:
            change = _set(path, value)
        cases.append(InvalidCase(name, description, _mutated(receipt, change), code, path))
    return [*cases, *_other_messages()]


_DELETE = object()


def _float_fourth_line(raw: dict[str, Any]) -> None:
    line = dict(raw["body"]["lines"][0], line_no=4, unit_price=189.9)
    raw["body"]["lines"].append(line)


def _malformed(good: bytes) -> list[InvalidCase]:
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    return [
        InvalidCase("not_msgpack", "0xc1 is never used by MessagePack", b"\xc1", "malformed", ""),
        InvalidCase("empty", "No bytes at all", b"", "malformed", ""),
        InvalidCase("truncated", "A valid receipt cut short", good[:-7], "malformed", ""),
        InvalidCase(
            "trailing_bytes",
            "A valid receipt followed by one more byte",
            good + b"\x00",
            "malformed",
            "",
        ),
        InvalidCase(
            "top_level_array", "The top level is an array, not a map", pack([1, 0]), "malformed", ""
        ),
        InvalidCase(
            "ext_timestamp",
            "A MessagePack timestamp (extension -1) as created_at",
            _with_ext(good),
            "malformed",
            "created_at",
        ),
        InvalidCase(
            "ext_type",
            "An application extension type 5 as a whole message",
            b"\xd4\x05\x01",
            "malformed",
            "",
        ),
        InvalidCase(
            "integer_map_key", "A map key that is an integer", b"\x81\x01\x02", "malformed", ""
        ),
        InvalidCase(
            "binary_map_key",
            "A map key that is binary, not a string",
            pack({b"v": [1, 0]}),
            "malformed",
            "",
        ),
        InvalidCase(
            "invalid_utf8", "A string that is not UTF-8", b"\x81\xa1v\xa2\xc3\x28", "malformed", ""
        ),
        InvalidCase(
            "too_deep",
            "A catalog value nested 40 levels deep",
            _deep_state(deep),
            "malformed",
            "body.state.x[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]",
        ),
        InvalidCase(
            "too_large",
            "A 500-byte receipt read with max_size=100",
            good,
            "too_large",
            "",
            max_size=100,
        ),
    ]


def _with_ext(good: bytes) -> bytes:
    raw = msgpack.unpackb(good)
    raw["created_at"] = msgpack.Timestamp(1_767_258_300)
    return pack(raw)


def _deep_state(value: object) -> bytes:
    state = CatalogChange(
        **ctl(61, "cat-upsert"),
        body=CatalogChangeBody(
            scope="global", scope_seq=1, entity="items", key="x", op="upsert", version=1
        ),
    )
    return _mutated(state, _set("body.state", {"x": value}))


def _envelope_errors(receipt: Receipt) -> list[InvalidCase]:
    def version(v: object) -> bytes:
        return _mutated(receipt, _set("v", v))

    both = raw_of(receipt)
    both["v"] = [1, 7]
    both["body"]["fiscal"] = {"fik": "b3a1-77f0"}
    del both["body"]["payments"]
    return [
        InvalidCase(
            "unsupported_major_2",
            "Protocol 2.0 is not spoken by a 1.x reader",
            version([2, 0]),
            "unsupported_version",
            "v",
        ),
        InvalidCase(
            "unsupported_major_0",
            "Protocol 0.9 predates v1",
            version([0, 9]),
            "unsupported_version",
            "v",
        ),
        InvalidCase(
            "missing_version", "No v field", _mutated(receipt, _delete("v")), "missing_field", "v"
        ),
        InvalidCase("wrong_type_version", "v as a string", version("1.0"), "wrong_type", "v"),
        InvalidCase(
            "unknown_type",
            "A message type v1 does not define",
            _mutated(receipt, _set("type", "coupon")),
            "unknown_type",
            "type",
        ),
        InvalidCase(
            "missing_type",
            "No type field",
            _mutated(receipt, _delete("type")),
            "missing_field",
            "type",
        ),
        InvalidCase(
            "newer_minor_missing_field",
            "A [1,7] message with unknown fields and a missing required one",
            pack(both),
            "missing_field",
            "body.payments",
        ),
    ]


def _other_messages() -> list[InvalidCase]:
    docs = dict((name, message) for name, _, message in valid_documents())
    ctls = dict((name, message) for name, _, message in valid_controls())
    cash = docs["cash_movement_in"]
    edit = docs["item_edit_price"]
    hb = ctls["heartbeat_full"]
    return [
        InvalidCase(
            "invalid_reversed_ack_range",
            "An ack range whose first seq is after its last",
            _mutated(ctls["ack_ranges"], _set("body.accepted[0]", {"first": 44, "last": 40})),
            "invalid_value",
            "body.accepted[0]",
        ),
        InvalidCase(
            "invalid_reversed_resend_range",
            "A resend request whose from_seq is after its to_seq",
            _mutated(ctls["resend_request"], _set("body.from_seq", 46)),
            "invalid_value",
            "body",
        ),
        InvalidCase(
            "invalid_reversed_z_report_range",
            "A Z-report whose first_seq is after its last_seq",
            _mutated(docs["shift_close_z_report"], _set("body.first_seq", 10_000)),
            "invalid_value",
            "body",
        ),
        InvalidCase(
            "invalid_enum_direction",
            "direction must be in or out",
            _mutated(cash, _set("body.direction", "sideways")),
            "invalid_value",
            "body.direction",
        ),
        InvalidCase(
            "out_of_range_cash_zero",
            "A cash movement of zero",
            _mutated(cash, _set("body.amount", 0)),
            "out_of_range",
            "body.amount",
        ),
        InvalidCase(
            "invalid_empty_item_edit",
            "An item edit that changes nothing",
            _mutated(edit, _set("body.changes", {})),
            "invalid_value",
            "body.changes",
        ),
        InvalidCase(
            "invalid_cursor_scope",
            "A cursor keyed by an invalid scope name",
            _mutated(hb, _set("body.cursors", {"Praha 1": 3})),
            "invalid_value",
            "body.cursors.Praha 1",
        ),
        InvalidCase(
            "invalid_sync_result",
            "An unknown sync result",
            _mutated(hb, _set("body.last_sync.result", "ok")),
            "invalid_value",
            "body.last_sync.result",
        ),
        InvalidCase(
            "invalid_catalog_value",
            "Binary inside a catalog state",
            _mutated(
                ctls["catalog_change_upsert"], _set("body.state.attributes.roast.level", b"\x03")
            ),
            "wrong_type",
            "body.state.attributes.roast.level",
        ),
    ]
