"""A page decoded by the register's quick path (``decode_control_pages``: checked, no
models) is turned into the very rows the decoded model gives, in every staging mode, with
and without labels, whatever scopes, entities, deletes and states the page holds; and the
service's path stages a reinit from the checked pages."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tillsync_agent import load_settings
from tillsync_agent.delta_rpc import DeltaRpc
from tillsync_agent.replica import ApplyMode, Replica
from tillsync_protocol import GLOBAL_SCOPE, DeltaPage, DeltaPageBody, decode_control, encode
from tillsync_protocol.codec import CheckedDeltaPage, decode_control_pages

from .catalog import CENTER, change, item_state, new_request_id, open_replica, pages

LABELS = ("bar", "kitchen")

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.sampled_from(LABELS),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
# Item states with the fields the rows look at in every shape: labels and barcodes as
# lists (of strings or not), a string, a map, absent.
_states = st.fixed_dictionaries(
    {"name": st.text(max_size=6)},
    optional={
        "labels": st.lists(st.sampled_from([*LABELS, "other", 3]), max_size=3) | _values,
        "barcodes": st.lists(st.text(max_size=5) | st.integers(0, 9), max_size=3) | _values,
        "extra": _values,
    },
)


@st.composite
def _changes(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(["upsert", "upsert", "delete"]))
    return {
        "scope": draw(st.sampled_from([GLOBAL_SCOPE, CENTER, "c-other"])),
        "scope_seq": draw(st.integers(1, 2**63 - 1)),
        "entity": draw(st.sampled_from(["items", "items", "customers", "prices"])),
        "key": draw(st.text(min_size=1, max_size=6)),
        "op": op,
        "version": draw(st.integers(1, 2**63 - 1)),
        "state": draw(st.none() | _states) if op == "delete" else draw(_states),
    }


def _page(request_id: str, changes: list[dict[str, Any]]) -> bytes:
    body = DeltaPageBody.model_validate(
        {"request_id": request_id, "page_no": 3, "changes": changes}
    )
    return encode(DeltaPage(msg_id=str(uuid.uuid4()), created_at=1, body=body))


def _same_rows(replica: Replica, request_id: str, changes: list[dict[str, Any]]) -> None:
    data = _page(request_id, changes)
    checked = decode_control_pages(data)
    assert isinstance(checked, CheckedDeltaPage)
    model = decode_control(data)
    assert isinstance(model, DeltaPage)
    assert replica.shadow_rows(request_id, checked) == replica.shadow_rows(request_id, model.body)


async def test_checked_and_decoded_pages_give_the_same_rows(tmp_path: Path) -> None:
    modes: list[ApplyMode] = ["replace", "delta", "update"]
    for labels in ((), ("bar",)):
        async with open_replica(tmp_path / f"{len(labels)}.db", labels=labels) as (_, replica, _):
            for mode in modes:
                request_id = new_request_id()
                await replica.begin_staging(request_id, mode)

                @settings(
                    max_examples=150,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                )
                @given(st.lists(_changes(), max_size=8))
                def check(changes: list[dict[str, Any]]) -> None:
                    _same_rows(replica, request_id, changes)  # noqa: B023 - called at once

                check()


async def test_a_reinit_staged_from_checked_pages_is_the_one_staged_from_models(
    tmp_path: Path,
) -> None:
    """Through the delta RPC's reply handler, as the service hands it the pages."""
    answer = [
        change(1, "a", item_state(barcodes=["1"])),
        change(2, "b", item_state(labels=["kitchen"], barcodes=["2"])),
        change(3, "c", op="delete"),
        change(4, "d", item_state(barcodes=["4"]), scope=CENTER),
        change(5, "e", {"name": "E"}, entity="customers", scope=CENTER),
        change(6, "f", item_state(), scope="c-other"),
    ]
    results = []
    for quick in (True, False):
        path = tmp_path / f"{quick}.db"
        config = load_settings(
            None,
            register_id="r-1",
            center_id=CENTER,
            amqp_url="amqp://127.0.0.1/",
            data_dir=tmp_path,
        )
        async with open_replica(path, labels=["bar"]) as (_, replica, _):
            rpc = DeltaRpc(config, replica, asyncio.Event())
            request_id = new_request_id()
            replies: asyncio.Queue[Any] = asyncio.Queue()
            rpc._replies[request_id] = replies  # as fetch() registers it
            await replica.begin_staging(request_id, "replace")
            for body in pages(answer, 4, request_id):
                data = encode(DeltaPage(msg_id=new_request_id(), created_at=0, body=body))
                reply = decode_control_pages(data) if quick else decode_control(data)
                assert isinstance(reply, CheckedDeltaPage if quick else DeltaPage)
                rpc.on_reply(reply)
            staged = [replies.get_nowait() for _ in range(2)]
            await replica.stage_rows(staged)
            applied = await replica.apply_staged(
                request_id, mode="replace", entities=["items", "customers"], cursors=None
            )
            results.append(
                (
                    [(p.foreign, p.changes) for p in staged],
                    applied.received,
                    applied.applied,
                    [(e.entity, e.key, e.scope, e.state) for e in await replica.all("items")],
                    [(e.key, e.state) for e in await replica.all("customers")],
                )
            )
    assert results[0] == results[1]
    assert results[0][0] == [(0, 4), (1, 2)]
    assert [key for _, key, _, _ in results[0][3]] == ["a", "d"]
