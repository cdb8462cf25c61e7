"""Decoding pauses Python's cyclic garbage collector and leaves it as it found it, whether
the message decodes or is refused, and decodes the same with the collector on or off."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import msgpack
import pytest

from tillsync_protocol import (
    MAX_MESSAGE_SIZE,
    FloatNotAllowedError,
    ProtocolError,
    decode,
    decode_control,
    decode_document,
    to_json,
)
from tillsync_protocol.codec import without_collection

from .vectors import load


@pytest.fixture
def collector() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_the_work_runs_with_the_collector_paused_and_it_is_back_after(collector: None) -> None:
    gc.enable()
    seen: list[bool] = []

    def work(a: int, *, b: int) -> int:
        seen.append(gc.isenabled())
        return a + b

    assert without_collection(work, 1, b=2) == 3
    assert seen == [False]
    assert gc.isenabled()


def test_a_collector_already_paused_stays_paused(collector: None) -> None:
    gc.disable()
    assert without_collection(gc.isenabled) is False
    assert not gc.isenabled()


def test_an_error_gives_the_collector_back(collector: None) -> None:
    gc.enable()
    bad = msgpack.packb({"v": [1, 0], "type": "heartbeat", "body": {"x": 1.5}})
    for function in (decode, decode_control, decode_document):
        with pytest.raises(FloatNotAllowedError):
            function(bad)
        assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        without_collection(lambda: 1 // 0)
    assert gc.isenabled()


@pytest.mark.parametrize("enabled", [True, False])
def test_every_golden_vector_decodes_the_same_with_the_collector_on_or_off(
    collector: None, enabled: bool
) -> None:
    (gc.enable if enabled else gc.disable)()
    for vector in load("valid"):
        assert to_json(decode(bytes.fromhex(vector["hex"]))) == vector["decoded"]
        assert gc.isenabled() is enabled
    for vector in load("invalid"):
        with pytest.raises(ProtocolError) as caught:
            decode(bytes.fromhex(vector["hex"]), max_size=vector.get("max_size", MAX_MESSAGE_SIZE))
        assert {"code": caught.value.code, "field": caught.value.field} == vector["error"]
        assert gc.isenabled() is enabled
