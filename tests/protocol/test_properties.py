"""Properties of the codec: every valid message round-trips; nothing but ProtocolError escapes."""

from __future__ import annotations

import copy
import json
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tillsync_protocol import MESSAGE_TYPES, Message, ProtocolError, decode, encode, to_json

from .strategies import for_model, msgpack_values, paths
from .vectors import load

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VECTORS = [bytes.fromhex(vector["hex"]) for vector in load("valid")]


@pytest.mark.parametrize("type_name", sorted(MESSAGE_TYPES))
def test_every_message_type_round_trips(type_name: str) -> None:
    cls = MESSAGE_TYPES[type_name]

    @BOUNDED
    @given(for_model(cls))
    def round_trip(message: Message) -> None:
        data = encode(message)
        decoded = decode(data)
        assert type(decoded) is cls
        assert decoded == message
        assert encode(decoded) == data
        assert to_json(decoded) == to_json(message)
        # Central stores documents' JSON with pydantic's own serializer: the same data.
        assert json.loads(message.model_dump_json()) == to_json(message)

    round_trip()


def _decodes_or_refuses(data: bytes) -> None:
    problem: ProtocolError | None = None
    try:
        message = decode(data)
    except ProtocolError as error:
        problem = error
    if problem is None:
        # Whatever is accepted is a real message that re-encodes and decodes the same.
        assert decode(encode(message)) == message
        return
    assert problem.code != "protocol_error", "every refusal carries a specific code"
    assert isinstance(problem.field, str)
    assert problem.reason


@BOUNDED
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes) -> None:
    _decodes_or_refuses(data)


@BOUNDED
@given(msgpack_values())
def test_arbitrary_msgpack_only_raises_protocol_errors(value: Any) -> None:
    _decodes_or_refuses(msgpack.packb(value, use_bin_type=True, strict_types=False))


@BOUNDED
@given(st.sampled_from(VECTORS), st.data())
def test_byte_mutations_of_valid_vectors_only_raise_protocol_errors(
    vector: bytes, data: st.DataObject
) -> None:
    mutated = bytearray(vector)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if action == "flip" and mutated:
            mutated[at] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        elif action == "delete" and mutated:
            del mutated[at]
        else:
            del mutated[at:]
    _decodes_or_refuses(bytes(mutated))


@BOUNDED
@given(st.sampled_from(VECTORS), st.data())
def test_structural_mutations_of_valid_vectors_only_raise_protocol_errors(
    vector: bytes, data: st.DataObject
) -> None:
    raw = copy.deepcopy(msgpack.unpackb(vector))
    path = data.draw(st.sampled_from(paths(raw)))
    parent: Any = raw
    for part in path[:-1]:
        parent = parent[part]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(msgpack_values())
    _decodes_or_refuses(msgpack.packb(raw, use_bin_type=True))
