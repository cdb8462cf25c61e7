"""``encode_batch`` and ``split_batch``: the framing of several documents in one message."""

from __future__ import annotations

import msgpack
import pytest

from tillsync_protocol import (
    MAX_BATCH_DOCUMENTS,
    MAX_BATCH_SIZE,
    MalformedError,
    TooLargeError,
    WrongTypeError,
    encode_batch,
    split_batch,
)
from tillsync_protocol.batch import batch_overhead


def test_documents_come_back_byte_for_byte_in_order() -> None:
    documents = [b"\x80", b"\x81\xa1a\x01", bytes(range(256)) * 3]
    assert split_batch(encode_batch(documents)) == documents


def test_the_writer_refuses_an_empty_an_overfull_and_an_oversized_batch() -> None:
    with pytest.raises(ValueError, match="1 to"):
        encode_batch([])
    with pytest.raises(ValueError, match="1 to"):
        encode_batch([b"\x80"] * (MAX_BATCH_DOCUMENTS + 1))
    with pytest.raises(ValueError, match="limit"):
        encode_batch([b"x" * (MAX_BATCH_SIZE // 2), b"x" * (MAX_BATCH_SIZE // 2)])


def test_the_overhead_bound_holds_for_every_bin_header_size() -> None:
    for sizes in ([1], [255] * 3, [256, 65_535], [65_536], [1] * 20):
        documents = [b"x" * size for size in sizes]
        assert len(encode_batch(documents)) - sum(sizes) <= batch_overhead(len(sizes))


def test_the_reader_checks_the_size_before_parsing() -> None:
    data = encode_batch([b"x" * 100])
    with pytest.raises(TooLargeError):
        split_batch(data, max_size=50)
    assert split_batch(data, max_size=len(data)) == [b"x" * 100]


@pytest.mark.parametrize(
    "data",
    [b"", b"\x91", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb(1)],
    ids=["empty", "truncated", "never_used_byte", "map", "int"],
)
def test_what_is_not_one_array_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedError) as caught:
        split_batch(data)
    assert caught.value.field == ""


def test_a_nested_element_is_the_wrong_type_at_its_index() -> None:
    data = msgpack.packb([b"\x80", [b"\x80"], b"\x80"], use_bin_type=True)
    with pytest.raises(WrongTypeError) as caught:
        split_batch(data)
    assert caught.value.field == "[1]"
