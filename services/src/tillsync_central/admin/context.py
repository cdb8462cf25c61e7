"""What every admin handler needs, built once per app and passed in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg
from starlette.templating import Jinja2Templates

from ..settings import CentralSettings
from .display import FILTERS
from .live import LiveFeed
from .queues import QueueMonitor

__all__ = ["AdminContext"]

TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class AdminContext:
    settings: CentralSettings
    pool: asyncpg.Pool
    monitor: QueueMonitor
    feed: LiveFeed
    templates: Jinja2Templates

    @classmethod
    def build(cls, settings: CentralSettings, pool: asyncpg.Pool) -> AdminContext:
        templates = Jinja2Templates(directory=str(TEMPLATES))
        templates.env.filters.update(FILTERS)
        return cls(
            settings=settings,
            pool=pool,
            monitor=QueueMonitor(settings),
            feed=LiveFeed(pool, offline_after_s=3 * settings.heartbeat_interval_s),
            templates=templates,
        )

    @property
    def offline_after_s(self) -> float:
        """A register is offline after three missed heartbeats."""
        return 3 * self.settings.heartbeat_interval_s
