"""``decode_control_pages``, the register's quick path for delta pages, is ``decode_control``
under another name: on arbitrary pages, valid or broken anywhere, it gives the same page
(its changes as tuples) or raises the same error (class, code, field, reason); every other
message comes back exactly as ``decode_control`` gives it."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tillsync_protocol import (
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    CatalogChangeBody,
    DeltaPage,
    DeltaPageBody,
    ProtocolError,
    decode_control,
    encode,
)
from tillsync_protocol.codec import ChangeRow, CheckedDeltaPage, decode_control_pages

from .strategies import for_model, msgpack_values, paths
from .vectors import load

BOUNDED = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELDS = ("scope", "scope_seq", "entity", "key", "op", "version", "state")


def outcome(decoder: Any, data: bytes) -> tuple[Any, ...]:
    try:
        return ("decoded", decoder(data))
    except ProtocolError as exc:
        return ("refused", type(exc), exc.code, exc.field, str(exc))


def rows_of(page: DeltaPage) -> list[ChangeRow]:
    return [tuple(getattr(c, name) for name in FIELDS) for c in page.body.changes]  # type: ignore[misc]


def assert_same(data: bytes) -> CheckedDeltaPage | None:
    """Both decoders agree on ``data``; returns the checked page when the quick path took it."""
    expected = outcome(decode_control, data)
    got = outcome(decode_control_pages, data)
    if expected[0] == "refused" or not isinstance(got[1], CheckedDeltaPage):
        assert got == expected
        return None
    page = got[1]
    model = expected[1]
    assert isinstance(model, DeltaPage)
    assert page.model() == model
    assert page.changes == rows_of(model)
    assert (page.request_id, page.page_no, page.msg_id) == (
        model.body.request_id,
        model.body.page_no,
        model.msg_id,
    )
    return page


# -- pages: valid ones, and the same broken in every way the model path can refuse ---------

ITEM_STATE = {
    "name": "Article 000001",
    "gross_price": 137,
    "currency": "CZK",
    "barcodes": ["8590000000017"],
    "labels": [],
}


def page_raw(changes: list[dict[str, Any]], **envelope: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "v": list(PROTOCOL_VERSION),
        "type": "delta_page",
        "created_at": 1_700_000_000_000,
        "msg_id": str(uuid.UUID(int=7)),
        "body": {"request_id": str(uuid.UUID(int=9)), "page_no": 1, "changes": changes},
    }
    raw.update(envelope)
    return raw


def a_change(i: int = 1, **fields: Any) -> dict[str, Any]:
    change: dict[str, Any] = {
        "scope": "c-1",
        "scope_seq": i,
        "entity": "items",
        "key": f"i{i:06d}",
        "op": "upsert",
        "version": i,
        "state": copy.deepcopy(ITEM_STATE),
    }
    change.update(fields)
    return change


# Values that sit on either side of a rule: bounds, lookalike types, lookalike strings.
EDGES = st.sampled_from(
    [
        0,
        1,
        -1,
        2**31,
        2**31 + 1,
        2**63 - 1,
        2**63,
        2**64 - 1,
        -(2**63),
        253_402_300_799_999,
        253_402_300_800_000,
        True,
        False,
        None,
        1.0,
        "",
        "a",
        "x" * 64,
        "x" * 65,
        "global",
        "global\n",
        "Global",
        "c-1",
        "-c",
        "c" * 63,
        "c" * 64,
        "items",
        "itemz",
        "upsert",
        "delete",
        "Upsert",
        b"items",
        b"c-1",
        str(uuid.UUID(int=1)),
        str(uuid.UUID(int=1)).upper(),
        str(uuid.UUID(int=1)) + "\n",
        [],
        {},
        [1, 0],
        [1, 1],
        [2, 0],
        [0, 0],
        [True, 0],
        msgpack.Timestamp(1, 0),
    ]
).map(copy.deepcopy)  # a mutation may change a drawn list or map in place


def nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


@st.composite
def mutated(draw: st.DrawFn, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with one to three things changed anywhere: a value replaced (by an edge or
    by anything MessagePack carries), a field removed, a field added, a deep value put in."""
    raw = copy.deepcopy(raw)
    for _ in range(draw(st.integers(1, 3))):
        found = paths(raw)
        if not found:
            break
        path = draw(st.sampled_from(found))
        parent: Any = raw
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["edge", "any", "delete", "add", "deep"]))
        if action == "edge":
            parent[path[-1]] = draw(EDGES)
        elif action == "any":
            parent[path[-1]] = draw(msgpack_values())
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            key = draw(st.sampled_from(["extra", "state", "v", b"key", 3]))
            parent[key] = draw(EDGES)
        elif action == "deep":
            parent[path[-1]] = nested(draw(st.integers(24, 30)), draw(EDGES))
    return raw


def valid_pages() -> st.SearchStrategy[dict[str, Any]]:
    """Pages the model accepts: drawn from the models (arbitrary states and fields) with our
    own minor version (a newer one takes the model path by design), or pages of items."""
    drawn = st.builds(
        lambda body, msg_id: page_raw([], msg_id=msg_id) | {"body": body.model_dump()},
        for_model(DeltaPageBody),
        st.uuids().map(str),
    )
    items = st.integers(0, 6).map(lambda n: page_raw([a_change(i + 1) for i in range(n)]))
    return drawn | items


def pack(raw: Any) -> bytes:
    return msgpack.packb(raw, use_bin_type=True)  # type: ignore[no-any-return]


@BOUNDED
@given(valid_pages())
def test_a_valid_page_takes_the_quick_path_and_is_the_models_page(raw: dict[str, Any]) -> None:
    assert assert_same(pack(raw)) is not None


@BOUNDED
@given(valid_pages().flatmap(mutated))
def test_a_broken_page_gives_the_models_error_or_the_models_page(raw: dict[str, Any]) -> None:
    assert_same(pack(raw))


@BOUNDED
@given(msgpack_values())
def test_any_messagepack_value_as_a_state_or_a_field(value: Any) -> None:
    for field in FIELDS:
        assert_same(pack(page_raw([a_change(1), a_change(2, **{field: value})])))
    assert_same(pack(page_raw([a_change(1, state={"deep": value, "ok": [1, "a"]})])))


@pytest.mark.parametrize("depth", range(24, 31))
def test_the_depth_limit_is_the_same_in_a_state(depth: int) -> None:
    """The state is a page's fifth level: the 32-level limit falls inside it."""
    for leaf in (1, "a", b"b", 1.5, None, [], {}):
        assert_same(pack(page_raw([a_change(1, state={"x": nested(depth, leaf)})])))


def test_errors_name_the_change_and_field_as_the_model_path_does() -> None:
    cases = {
        "scope_seq": 0,
        "key": "",
        "entity": "itemz",
        "op": "merge",
        "scope": "Global",
        "version": True,
        "state": {"barcodes": [b"859"]},
    }
    for field, value in cases.items():
        data = pack(page_raw([a_change(1), a_change(2, **{field: value})]))
        with pytest.raises(ProtocolError) as raised:
            decode_control_pages(data)
        assert raised.value.field.startswith(f"body.changes[1].{field}")
        assert_same(data)
    broken = a_change(2)
    del broken["version"]
    data = pack(page_raw([a_change(1), broken]))
    with pytest.raises(ProtocolError) as raised:
        decode_control_pages(data)
    assert (raised.value.code, raised.value.field) == ("missing_field", "body.changes[1].version")


def test_a_newer_minor_version_drops_unknown_fields_as_the_model_path_does() -> None:
    raw = page_raw([a_change(1, colour="red")], v=[PROTOCOL_VERSION[0], PROTOCOL_VERSION[1] + 1])
    raw["body"]["later"] = 1
    page = decode_control_pages(pack(raw))
    assert isinstance(page, DeltaPage)
    assert page == decode_control(pack(raw))


def test_a_page_of_the_limit_and_one_over() -> None:
    many = [a_change(i + 1, state=None, op="delete") for i in range(5000)]
    assert assert_same(pack(page_raw(many))) is not None
    with pytest.raises(ProtocolError) as raised:
        decode_control_pages(pack(page_raw([*many, a_change(5001)])))
    assert (raised.value.code, raised.value.field) == ("out_of_range", "body.changes")


def test_a_page_made_by_encode_round_trips() -> None:
    page = DeltaPage(
        msg_id=str(uuid.UUID(int=3)),
        created_at=5,
        body=DeltaPageBody(
            request_id=str(uuid.UUID(int=4)),
            page_no=2,
            changes=[
                CatalogChangeBody.model_validate(a_change(1)),
                CatalogChangeBody.model_validate(a_change(2, op="delete", state=None)),
                CatalogChangeBody.model_validate({**a_change(3), "scope": "global"}),
            ],
        ),
    )
    checked = decode_control_pages(encode(page))
    assert isinstance(checked, CheckedDeltaPage)
    assert checked.model() == page
    assert checked.changes[1] == ("c-1", 2, "items", "i000002", "delete", 2, None)


def test_every_golden_vector_decodes_or_is_refused_the_same() -> None:
    for vector in load("valid"):
        data = bytes.fromhex(vector["hex"])
        assert_same(data)
    for vector in load("invalid"):
        data = bytes.fromhex(vector["hex"])
        limit = vector.get("max_size", MAX_MESSAGE_SIZE)
        with pytest.raises(ProtocolError) as raised:
            decode_control_pages(data, max_size=limit)
        with pytest.raises(ProtocolError) as model:
            decode_control(data, max_size=limit)
        assert (type(raised.value), raised.value.code, raised.value.field) == (
            type(model.value),
            model.value.code,
            model.value.field,
        )
        assert str(raised.value) == str(model.value)
