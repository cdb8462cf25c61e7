"""Document batches: several documents of one register in one AMQP message.

A batch is a framing, not a message: its body is one MessagePack **array of bin**, each
element the exact bytes of one encoded document (which is decoded with its own rules,
one by one). It exists because a broker's, a publisher's and a consumer's cost is per
message: a register with many documents pending publishes them in far fewer messages,
and central still stores, deduplicates, refuses and acknowledges every document on its
own. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack

from .codec import MAX_MESSAGE_SIZE
from .errors import MalformedError, OutOfRangeError, TooLargeError, WrongTypeError

__all__ = [
    "BATCH_TYPE",
    "MAX_BATCH_DOCUMENTS",
    "MAX_BATCH_SIZE",
    "batch_overhead",
    "encode_batch",
    "split_batch",
]

BATCH_TYPE = "document_batch"
"""The AMQP ``type`` of a batch, and the last part of its routing key in place of a
document type (``<center>.<register>.document_batch``)."""
MAX_BATCH_DOCUMENTS = 500
MAX_BATCH_SIZE = MAX_MESSAGE_SIZE
"""A batch's encoded size limit: the limit of one message (1 MiB)."""


def encode_batch(documents: Sequence[bytes]) -> bytes:
    """The batch body of ``documents`` (encoded documents, in the order given).

    Raises ``ValueError`` for an empty batch, more than :data:`MAX_BATCH_DOCUMENTS`, or
    more than :data:`MAX_BATCH_SIZE` bytes: a writer sizes its batches before encoding."""
    if not 1 <= len(documents) <= MAX_BATCH_DOCUMENTS:
        count = len(documents)
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_DOCUMENTS} documents, not {count}")
    data: bytes = msgpack.packb([bytes(d) for d in documents], use_bin_type=True)
    if len(data) > MAX_BATCH_SIZE:
        raise ValueError(f"the batch is {len(data)} bytes, the limit is {MAX_BATCH_SIZE}")
    return data


def batch_overhead(count: int) -> int:
    """Bytes a batch of ``count`` documents adds to their own: the array header and one
    bin header each (at most 5 bytes apiece)."""
    return 5 + 5 * count


def split_batch(
    data: bytes,
    *,
    max_size: int = MAX_BATCH_SIZE,
    max_documents: int = MAX_BATCH_DOCUMENTS,
) -> list[bytes]:
    """The documents' bytes of a batch body, checked strictly (not the documents
    themselves: decode each with ``decode_document``).

    ``too_large`` over ``max_size``; ``malformed`` for anything but exactly one
    MessagePack array with nothing after it (field ``""``); ``out_of_range`` for an
    empty array or more than ``max_documents`` elements (field ``""``); ``wrong_type`` for
    an element that is not a non-empty bin (field ``[i]``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise TooLargeError(f"the batch is {len(data)} bytes, the limit is {max_size}")
    if not data:
        raise MalformedError("empty batch")
    # raw=False tells a str element (refused) from a bin one.
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data))
    unpacker.feed(bytes(data))
    try:
        count = unpacker.read_array_header()
    except msgpack.OutOfData:
        raise MalformedError("truncated batch") from None
    except Exception:  # msgpack raises several unrelated types on bad input
        raise MalformedError("the top level of a batch must be an array of bin") from None
    if not 1 <= count <= max_documents:
        raise OutOfRangeError(f"a batch holds 1 to {max_documents} documents, not {count}")
    documents: list[bytes] = []
    for index in range(count):
        try:
            element = unpacker.unpack()
        except msgpack.OutOfData:
            raise MalformedError(f"truncated batch: {index} of {count} documents") from None
        except Exception as exc:
            raise MalformedError(f"not valid MessagePack: {type(exc).__name__}") from None
        if type(element) is not bytes or not element:
            raise WrongTypeError(
                "each element of a batch is the bin of one encoded document",
                field=f"[{index}]",
            )
        documents.append(element)
    if unpacker.tell() != len(data):
        raise MalformedError("trailing bytes after the batch")
    return documents
