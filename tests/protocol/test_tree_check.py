"""The codec's tree check: its quick scan never lets through what the reporting walk
refuses, and every message gets exactly the error the walk alone would give."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tillsync_protocol import FloatNotAllowedError, MalformedError, ProtocolError, decode
from tillsync_protocol.codec import _check_tree, _find_problem

from .strategies import msgpack_values

BOUNDED = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(check: Any, tree: dict[Any, Any]) -> tuple[str, str, str] | None:
    try:
        check(tree)
    except ProtocolError as exc:
        return type(exc).__name__, exc.code, exc.field
    return None


def _nested(depth: int, leaf: Any) -> dict[str, Any]:
    tree: Any = leaf
    for level in range(depth):
        tree = [tree] if level % 2 else {"k": tree}
    return {"root": tree}


trees = st.dictionaries(st.text(max_size=8), msgpack_values(), max_size=5) | st.builds(
    _nested,
    st.integers(0, 40),
    st.sampled_from([0, "x", None, 1.5, msgpack.Timestamp(1, 0), b"\x00", {1: 2}]),
)


@BOUNDED
@given(trees)
def test_the_quick_scan_gives_the_walks_verdict(tree: dict[Any, Any]) -> None:
    assert _outcome(_check_tree, tree) == _outcome(_find_problem, tree)


@pytest.mark.parametrize(
    ("tree", "error", "field"),
    [
        ({"body": {"state": {"a": [1, {"b": 2.5}]}}}, FloatNotAllowedError, "body.state.a[1].b"),
        ({"body": {"state": {"t": msgpack.Timestamp(1, 0)}}}, MalformedError, "body.state.t"),
        ({"body": {"state": {3: "x"}}}, MalformedError, "body.state"),
        (_nested(31, 1), None, None),
        (_nested(32, 1), MalformedError, None),
    ],
)
def test_problems_deep_in_a_catalog_state_are_reported_where_they_are(
    tree: dict[Any, Any], error: type[ProtocolError] | None, field: str | None
) -> None:
    if error is None:
        _check_tree(tree)
        return
    with pytest.raises(error) as caught:
        _check_tree(tree)
    if field is not None:
        assert caught.value.field == field


def test_a_float_in_a_delta_page_state_is_refused_on_decode() -> None:
    page = {
        "v": [1, 0],
        "type": "delta_page",
        "created_at": 1,
        "msg_id": "00000000-0000-4000-8000-000000000000",
        "body": {
            "request_id": "00000000-0000-4000-8000-000000000001",
            "page_no": 1,
            "changes": [
                {
                    "scope": "global",
                    "scope_seq": 1,
                    "entity": "items",
                    "key": "i1",
                    "op": "upsert",
                    "version": 1,
                    "state": {"gross_price": 1.5},
                }
            ],
        },
    }
    with pytest.raises(FloatNotAllowedError) as caught:
        decode(msgpack.packb(page, use_bin_type=True))
    assert caught.value.field == "body.changes[0].state.gross_price"
