"""Targeted rules of the codec: forward compatibility, kinds, limits and field paths."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest

from tillsync_protocol import (
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    Ack,
    ControlMessage,
    Document,
    FloatNotAllowedError,
    Heartbeat,
    MalformedError,
    MissingFieldError,
    OutOfRangeError,
    ProtocolError,
    Receipt,
    TooLargeError,
    UnknownFieldError,
    UnknownTypeError,
    WrongTypeError,
    decode,
    decode_control,
    decode_document,
    encode,
    field_path,
)

from .vectors import load

VALID = {vector["name"]: bytes.fromhex(vector["hex"]) for vector in load("valid")}
NEWER_MINOR = [PROTOCOL_VERSION[0], PROTOCOL_VERSION[1] + 1]


def raw(name: str) -> dict[str, Any]:
    """The map of a valid vector, to change in one place."""
    return copy.deepcopy(msgpack.unpackb(VALID[name]))


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def error_of(data: bytes, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode(data, **kwargs)
    return caught.value


# --- forward compatibility ------------------------------------------------------------


def test_newer_minor_drops_unknown_fields_at_every_level() -> None:
    original = decode(VALID["receipt_eur_foreign_tender"])
    message = raw("receipt_eur_foreign_tender")
    message["v"] = NEWER_MINOR
    message["loyalty_card"] = "4417"
    message["body"]["fiscal"] = {"fik": "b3a1"}
    message["body"]["lines"][0]["promo_id"] = "p-1"
    message["body"]["payments"][0]["foreign"]["source"] = "ecb"
    decoded = decode(pack(message))
    assert isinstance(decoded, Receipt)
    assert decoded.v == NEWER_MINOR
    assert decoded.model_copy(update={"v": list(PROTOCOL_VERSION)}) == original


def test_newer_minor_drops_unknown_fields_inside_optional_structures() -> None:
    message = raw("heartbeat_full")
    message["v"] = NEWER_MINOR
    message["body"]["last_sync"]["retries"] = 2
    decoded = decode(pack(message))
    assert isinstance(decoded, Heartbeat)
    assert decoded.body.last_sync is not None
    assert decoded.body.last_sync.sent == 14


@pytest.mark.parametrize("minor", range(PROTOCOL_VERSION[1] + 1))
def test_same_or_older_minor_refuses_unknown_fields(minor: int) -> None:
    message = raw("receipt_czk_vat")
    message["v"] = [PROTOCOL_VERSION[0], minor]
    message["body"]["lines"][1]["color"] = "red"
    error = error_of(pack(message))
    assert isinstance(error, UnknownFieldError)
    assert (error.code, error.field) == ("unknown_field", "body.lines[1].color")


def test_newer_minor_with_unknown_and_missing_fields_reports_the_missing_one() -> None:
    message = raw("receipt_czk_vat")
    message["v"] = NEWER_MINOR
    message["extension"] = {"a": 1}
    del message["body"]["lines"][0]["total"]
    error = error_of(pack(message))
    assert isinstance(error, MissingFieldError)
    assert error.field == "body.lines[0].total"


def test_newer_minor_still_refuses_floats_even_in_unknown_fields() -> None:
    message = raw("receipt_czk_vat")
    message["v"] = NEWER_MINOR
    message["tip_ratio"] = 0.1
    error = error_of(pack(message))
    assert isinstance(error, FloatNotAllowedError)
    assert error.field == "tip_ratio"


def test_newer_minor_still_validates_known_fields() -> None:
    message = raw("receipt_czk_vat")
    message["v"] = NEWER_MINOR
    message["new_field"] = 1
    message["seq"] = "41"
    error = error_of(pack(message))
    assert (error.code, error.field) == ("wrong_type", "seq")


# --- kinds ----------------------------------------------------------------------------


def test_decode_document_accepts_documents_and_refuses_control_messages() -> None:
    assert isinstance(decode_document(VALID["shift_open"]), Document)
    with pytest.raises(UnknownTypeError) as caught:
        decode_document(VALID["ack_ranges"])
    assert caught.value.field == "type"
    assert "not a document" in caught.value.reason


def test_decode_control_accepts_control_messages_and_refuses_documents() -> None:
    assert isinstance(decode_control(VALID["ack_ranges"]), Ack)
    assert isinstance(decode_control(VALID["ack_ranges"]), ControlMessage)
    with pytest.raises(UnknownTypeError) as caught:
        decode_control(VALID["receipt_czk_vat"])
    assert caught.value.field == "type"
    assert "not a control" in caught.value.reason


def test_kind_decoders_check_the_bytes_as_strictly_as_decode() -> None:
    for decoder in (decode_document, decode_control):
        with pytest.raises(MalformedError):
            decoder(VALID["receipt_czk_vat"] + b"\x00")
        with pytest.raises(TooLargeError):
            decoder(VALID["ack_ranges"], max_size=10)


# --- limits ---------------------------------------------------------------------------


def test_max_size_is_inclusive() -> None:
    data = VALID["receipt_czk_vat"]
    assert decode(data, max_size=len(data)).type == "receipt"
    error = error_of(data, max_size=len(data) - 1)
    assert isinstance(error, TooLargeError)
    assert str(len(data)) in error.reason


def test_default_limit_is_one_mebibyte_and_checked_before_parsing() -> None:
    assert MAX_MESSAGE_SIZE == 1024 * 1024
    assert isinstance(error_of(b"\xc1" * (MAX_MESSAGE_SIZE + 1)), TooLargeError)
    # Exactly at the limit the bytes are parsed (and here found malformed).
    assert isinstance(error_of(b"\xc1" * MAX_MESSAGE_SIZE), MalformedError)


def _catalog_state_nested(levels: int) -> bytes:
    message = raw("catalog_change_upsert")
    value: object = 1
    for _ in range(levels):
        value = [value]
    message["body"]["state"] = {"x": value}
    return pack(message)


def test_nesting_up_to_thirty_two_levels_is_accepted() -> None:
    # top-level map (1) → body (2) → state (3) → 29 arrays: 32 levels.
    assert decode(_catalog_state_nested(29)).type == "catalog_change"
    error = error_of(_catalog_state_nested(30))
    assert isinstance(error, MalformedError)
    assert error.field.startswith("body.state.x[0][0]")


@pytest.mark.parametrize("levels", [1_000, 5_000, 200_000])
def test_very_deep_nesting_is_malformed_not_a_crash(levels: int) -> None:
    # msgpack-python cannot pack this deep; write the bytes by hand.
    data = b"\x82\xa1v\x92\x01\x00\xa1x" + b"\x91" * levels + b"\x01"
    assert isinstance(error_of(data), MalformedError)


def test_invalid_utf8_anywhere_is_malformed() -> None:
    good = VALID["shift_open"]
    bad = good.replace(b"emp-novakova", b"emp-nov\xc3\x28kova")
    assert bad != good
    error = error_of(bad)
    assert isinstance(error, MalformedError)
    assert "UTF-8" in error.reason


@pytest.mark.parametrize("key", [7, b"seq", True, None])
def test_non_string_map_keys_are_malformed_at_any_depth(key: object) -> None:
    # msgpack-python cannot pack a None or bool key with strict settings: write it by hand.
    body_map = msgpack.packb(raw("shift_open")["body"])
    injected = body_map[:1] + msgpack.packb(key) + b"\x01" + body_map[1:]
    injected = bytes([body_map[0] + 1]) + injected[1:]
    data = VALID["shift_open"].replace(body_map, injected)
    assert data != VALID["shift_open"]
    error = error_of(data)
    assert isinstance(error, MalformedError)
    assert error.field in {"", "body"}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("seq", True),
        ("created_at", False),
        ("body.opening_float", True),
        ("body.shift_no", False),
    ],
)
def test_booleans_are_not_integers(path: str, value: bool) -> None:
    message = raw("shift_open")
    node: Any = message
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    error = error_of(pack(message))
    assert isinstance(error, WrongTypeError)
    assert error.field == path


def test_boolean_version_parts_are_refused() -> None:
    message = raw("shift_open")
    message["v"] = [True, False]
    error = error_of(pack(message))
    assert isinstance(error, WrongTypeError)
    assert error.field == "v"


def test_input_must_be_bytes_like() -> None:
    data = VALID["void"]
    # Typed as bytes, but any bytes-like object AMQP clients hand over is accepted.
    assert decode(bytearray(data)) == decode(data)  # type: ignore[arg-type]
    assert decode(memoryview(data)) == decode(data)  # type: ignore[arg-type]
    error = error_of(data.hex())  # type: ignore[arg-type]
    assert isinstance(error, MalformedError)


# --- field paths ----------------------------------------------------------------------


def test_field_path_of_a_bad_line_names_index_and_field() -> None:
    message = raw("receipt_czk_vat")
    fourth = dict(message["body"]["lines"][0], line_no=4, unit_price=10**16)
    message["body"]["lines"].append(fourth)
    error = error_of(pack(message))
    assert isinstance(error, OutOfRangeError)
    assert error.field == "body.lines[3].unit_price"
    assert error.to_dict() == {
        "code": "out_of_range",
        "field": "body.lines[3].unit_price",
        "reason": error.reason,
    }
    assert str(error).startswith("out_of_range at body.lines[3].unit_price: ")


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        ((), ""),
        (("seq",), "seq"),
        (("body", "lines", 3, "unit_price"), "body.lines[3].unit_price"),
        (("body", "payments", 0, "foreign", "rate"), "body.payments[0].foreign.rate"),
        (["body", "state", "a", 0, 1], "body.state.a[0][1]"),
        (("v", 1), "v[1]"),
    ],
)
def test_field_path_format(loc: tuple[int | str, ...], path: str) -> None:
    assert field_path(loc) == path


def test_field_path_of_a_deep_catalog_value_points_at_the_leaf() -> None:
    message = raw("catalog_change_upsert")
    message["body"]["state"]["attributes"]["tags"] = ["a", {"b": 1.5}]
    error = error_of(pack(message))
    assert (error.code, error.field) == ("float_not_allowed", "body.state.attributes.tags[1].b")
    message["body"]["state"]["attributes"]["tags"] = ["a", {"b": b"\x00"}]
    error = error_of(pack(message))
    assert (error.code, error.field) == ("wrong_type", "body.state.attributes.tags[1].b")


# --- encoding -------------------------------------------------------------------------


def test_encoding_writes_declared_order_and_nil_for_unset_options() -> None:
    message = decode(VALID["receipt_minimal"])
    unpacked = msgpack.unpackb(encode(message))
    assert list(unpacked) == list(type(message).model_fields)
    assert list(unpacked["body"]) == list(type(message.body).model_fields)  # type: ignore[attr-defined]
    assert unpacked["body"]["customer_id"] is None
    assert unpacked["body"]["discounts"] == []
    assert unpacked["v"] == list(PROTOCOL_VERSION)


def test_encoding_never_writes_a_float_or_binary() -> None:
    for data in VALID.values():
        stack: list[object] = [msgpack.unpackb(encode(decode(data)), raw=False)]
        while stack:
            value = stack.pop()
            assert not isinstance(value, (float, bytes))
            if isinstance(value, dict):
                assert all(isinstance(key, str) for key in value)
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
