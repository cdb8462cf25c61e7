"""How the sender cuts a round's rows into messages: in seq order, at most
``publish_batch_max`` a message, and never a batch over the protocol's size limit."""

from __future__ import annotations

from tillsync_agent.outbox import OutboxRow
from tillsync_agent.sender import ALONE_AFTER_ATTEMPTS, _groups
from tillsync_protocol import MAX_BATCH_SIZE, encode_batch, split_batch


def _rows(*sizes: int, attempts: dict[int, int] | None = None) -> list[OutboxRow]:
    tried = attempts or {}
    return [
        OutboxRow(seq, f"doc-{seq}", "receipt", bytes([seq % 256]) * size, tried.get(seq, 0))
        for seq, size in enumerate(sizes, start=1)
    ]


def test_runs_of_at_most_the_setting_in_seq_order() -> None:
    rows = _rows(*[100] * 23)
    groups = _groups(rows, 10)
    assert [len(g) for g in groups] == [10, 10, 3]
    assert [r.seq for g in groups for r in g] == list(range(1, 24))
    assert [len(g) for g in _groups(rows, 1)] == [1] * 23


def test_a_batch_is_cut_before_it_would_pass_the_size_limit() -> None:
    third = MAX_BATCH_SIZE // 3
    rows = _rows(third, third, third, 10, 10)
    groups = _groups(rows, 50)
    assert [[r.seq for r in g] for g in groups] == [[1, 2], [3, 4, 5]]
    for group in groups:
        body = encode_batch([r.payload for r in group])  # raises over the limit
        assert split_batch(body) == [r.payload for r in group]


def test_a_document_too_large_to_share_goes_alone() -> None:
    rows = _rows(10, MAX_BATCH_SIZE - 20, 10)
    assert [[r.seq for r in g] for g in _groups(rows, 50)] == [[1], [2], [3]]


def test_rows_tried_often_without_an_ack_go_alone_and_the_rest_still_in_batches() -> None:
    # 3 and 6 from a batch central could not take; 7 not tried as often yet.
    tried = {3: ALONE_AFTER_ATTEMPTS, 6: ALONE_AFTER_ATTEMPTS + 4, 7: ALONE_AFTER_ATTEMPTS - 1}
    rows = _rows(*[100] * 8, attempts=tried)
    groups = _groups(rows, 50)
    assert [[r.seq for r in g] for g in groups] == [[1, 2], [3], [4, 5], [6], [7, 8]]
