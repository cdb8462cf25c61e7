"""Catalog changes and pages for the replica tests, as central would send them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tillsync_agent.outbox import Outbox
from tillsync_agent.replica import Replica
from tillsync_agent.store import Store
from tillsync_protocol import CatalogChangeBody, DeltaPageBody

CENTER = "c-1"


def item_state(name: str = "Rohlík", price: int = 390, **extra: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        "name": name,
        "gross_price": price,
        "currency": "CZK",
        "tax_rate_id": "vat-12",
        "barcodes": [],
        "labels": [],
        "active": True,
    }
    state.update(extra)
    return state


def change(
    seq: int,
    key: str,
    state: dict[str, Any] | None = None,
    *,
    entity: str = "items",
    scope: str = "global",
    version: int = 1,
    op: str = "upsert",
) -> CatalogChangeBody:
    return CatalogChangeBody.model_validate(
        {
            "scope": scope,
            "scope_seq": seq,
            "entity": entity,
            "key": key,
            "op": op,
            "version": version,
            "state": None if op == "delete" else (state or item_state(key)),
        }
    )


def pages(changes: Sequence[CatalogChangeBody], size: int, request_id: str) -> list[DeltaPageBody]:
    return [
        DeltaPageBody(request_id=request_id, page_no=n + 1, changes=list(changes[i : i + size]))
        for n, i in enumerate(range(0, len(changes), size))
    ]


def new_request_id() -> str:
    return str(uuid.uuid4())


@asynccontextmanager
async def open_replica(
    path: Path, *, labels: Sequence[str] = (), queue_size: int = 1000
) -> AsyncIterator[tuple[Store, Replica, Outbox]]:
    async with Store(path) as store:
        outbox = Outbox(store, register_id="r-1", center_id=CENTER)
        await outbox.load()
        replica = Replica(store, path=path, center_id=CENTER, labels=labels, queue_size=queue_size)
        await replica.open()
        try:
            yield store, replica, outbox
        finally:
            await replica.close()
