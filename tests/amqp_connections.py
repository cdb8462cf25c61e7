"""Watching the aio-pika connections a test's code makes, without holding them alive."""

from __future__ import annotations

import weakref
from typing import Any

import aio_pika
import pytest


def watch_connections(monkeypatch: pytest.MonkeyPatch) -> weakref.WeakSet[aio_pika.Connection]:
    """Every ``aio_pika.Connection`` made from now until the test ends."""
    made: weakref.WeakSet[aio_pika.Connection] = weakref.WeakSet()
    init = aio_pika.Connection.__init__

    def watched_init(self: aio_pika.Connection, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.add(self)

    monkeypatch.setattr(aio_pika.Connection, "__init__", watched_init)
    return made
