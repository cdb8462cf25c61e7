"""Every golden vector decodes (or fails) exactly as it says, and the set covers the protocol."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tillsync_protocol import (
    MAX_BATCH_DOCUMENTS,
    MAX_MESSAGE_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_ERROR_CODES,
    ProtocolError,
    decode,
    encode,
    encode_batch,
    split_batch,
    to_json,
)

from .vectors import VECTORS, generator, load

VALID = load("valid")
INVALID = load("invalid")
BATCHES = load("batch")


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_valid_vector_decodes_to_its_json(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    message = decode(data)
    assert to_json(message) == vector["decoded"]
    assert message.type == vector["decoded"]["type"]
    if vector.get("canonical", True):
        assert encode(message) == data
    else:
        assert encode(message) != data, "a vector marked non-canonical re-encodes identically"
        # What the reader kept is stable: its canonical form decodes to the same message.
        assert decode(encode(message)) == message


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector_raises_its_code_and_field(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    with pytest.raises(ProtocolError) as caught:
        decode(data, max_size=vector.get("max_size", MAX_MESSAGE_SIZE))
    error = caught.value
    assert type(error) is not ProtocolError, "a bare ProtocolError carries no specific code"
    assert {"code": error.code, "field": error.field} == vector["error"]
    assert error.reason


@pytest.mark.parametrize("vector", BATCHES, ids=[v["name"] for v in BATCHES])
def test_batch_vector_splits_into_its_documents_or_raises_its_error(
    vector: dict[str, Any],
) -> None:
    data = bytes.fromhex(vector["hex"])
    limit = vector.get("max_documents", MAX_BATCH_DOCUMENTS)
    if "error" in vector:
        with pytest.raises(ProtocolError) as caught:
            split_batch(data, max_documents=limit)
        assert {"code": caught.value.code, "field": caught.value.field} == vector["error"]
        assert caught.value.reason
        return
    documents = split_batch(data, max_documents=limit)
    assert [d.hex() for d in documents] == vector["documents"]
    assert encode_batch(documents) == data  # the canonical encoding
    for document in documents:
        decode(document)


def test_batch_vectors_cover_valid_and_every_batch_error() -> None:
    assert sum("documents" in v for v in BATCHES) >= 2
    codes = {(v["error"]["code"], v["error"]["field"]) for v in BATCHES if "error" in v}
    assert {code for code, _ in codes} == {"malformed", "out_of_range", "wrong_type"}


def test_vector_files_are_well_formed() -> None:
    for vector in VALID:
        assert set(vector) <= {"name", "description", "hex", "decoded", "canonical"}
        assert {"name", "description", "hex", "decoded"} <= set(vector)
    for vector in INVALID:
        assert set(vector) <= {"name", "description", "hex", "error", "max_size"}
        assert {"name", "description", "hex", "error"} <= set(vector)
        assert set(vector["error"]) == {"code", "field"}
    for vector in BATCHES:
        assert set(vector) <= {"name", "description", "hex", "documents", "error", "max_documents"}
        assert ("documents" in vector) != ("error" in vector)
    for kind in ("valid", "invalid", "batch"):
        for path in (VECTORS / kind).glob("*.json"):
            assert json.loads(path.read_text(encoding="utf-8"))["name"] == path.stem


def test_there_are_at_least_forty_vectors() -> None:
    assert len(VALID) + len(INVALID) >= 40


def test_every_message_type_has_a_valid_vector() -> None:
    covered = {vector["decoded"]["type"] for vector in VALID}
    assert covered == set(MESSAGE_TYPES)


def test_every_protocol_error_code_has_an_invalid_vector() -> None:
    covered = {vector["error"]["code"] for vector in INVALID}
    assert covered == set(PROTOCOL_ERROR_CODES)


def test_forward_compatible_vector_is_a_newer_minor_with_unknown_fields() -> None:
    vector = next(v for v in VALID if v["name"] == "forward_compat_minor_7")
    assert vector["decoded"]["v"] == [1, 7]
    assert vector.get("canonical") is False
    assert "trace_id" not in vector["decoded"]
    assert "fiscal" not in vector["decoded"]["body"]
    assert "promo_id" not in vector["decoded"]["body"]["lines"][0]


def test_committed_vectors_are_what_the_generator_writes() -> None:
    expected = generator().vector_files()
    on_disk = {
        path: path.read_text(encoding="utf-8")
        for kind in ("valid", "invalid", "batch")
        for path in (VECTORS / kind).glob("*.json")
    }
    assert sorted(on_disk) == sorted(expected)
    stale = [path.name for path, text in expected.items() if on_disk[path] != text]
    assert not stale, f"rerun protocol/vectors/generate.py: {stale}"
