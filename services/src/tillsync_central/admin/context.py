"""What every admin handler needs, built once per app and passed in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from starlette.templating import Jinja2Templates

from ..settings import CentralSettings
from .display import FILTERS
from .errors import AdminError
from .live import LiveFeed
from .operators import Operator, authenticate
from .queues import QueueMonitor
from .throttle import LoginThrottle

__all__ = ["AdminContext"]

TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class AdminContext:
    settings: CentralSettings
    pool: asyncpg.Pool
    monitor: QueueMonitor
    feed: LiveFeed
    templates: Jinja2Templates
    throttle: LoginThrottle = field(default_factory=LoginThrottle)

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

    async def log_in(self, username: str, password: str) -> Operator:
        """The operator, or ``login_failed`` / ``too_many_attempts`` (see throttle.py)."""
        self.throttle.check(username)
        try:
            operator = await authenticate(self.pool, username, password)
        except AdminError:
            self.throttle.failed(username)
            raise
        self.throttle.succeeded(username)
        return operator

    @property
    def offline_after_s(self) -> float:
        """A register is offline after three missed heartbeats."""
        return 3 * self.settings.heartbeat_interval_s
