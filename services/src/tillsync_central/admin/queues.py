"""Queue depths, rates, consumers and unacked counts of every tillsync queue, from the
RabbitMQ management API, with a short in-memory history for the dashboard's chart.

:class:`QueueMonitor` samples every ``admin_queue_sample_s`` while the app runs and keeps
the last :data:`HISTORY` samples per queue: a chart of the last minutes, not a time-series
database (Prometheus and the broker's own plugin keep the long history).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog

from tillsync_protocol import TillsyncError

from ..management import Management
from ..settings import CentralSettings

__all__ = ["HISTORY", "QueueMonitor", "QueueStats", "sparkline"]

log = structlog.get_logger(__name__)

HISTORY = 120
_COLUMNS = (
    "name,type,messages,messages_ready,messages_unacknowledged,consumers,state,"
    "message_stats.publish_details.rate,message_stats.deliver_get_details.rate,"
    "message_stats.ack_details.rate"
)


def _rate(stats: dict[str, Any], name: str) -> float:
    details = stats.get(f"{name}_details") or {}
    return float(details.get("rate", 0.0))


@dataclass(frozen=True)
class QueueStats:
    name: str
    type: str
    messages: int
    ready: int
    unacked: int
    consumers: int
    state: str
    publish_rate: float
    deliver_rate: float
    ack_rate: float

    @classmethod
    def from_api(cls, queue: dict[str, Any]) -> QueueStats:
        stats = queue.get("message_stats") or {}
        return cls(
            name=queue["name"],
            type=queue.get("type", "classic"),
            messages=int(queue.get("messages") or 0),
            ready=int(queue.get("messages_ready") or 0),
            unacked=int(queue.get("messages_unacknowledged") or 0),
            consumers=int(queue.get("consumers") or 0),
            state=str(queue.get("state", "")),
            publish_rate=_rate(stats, "publish"),
            deliver_rate=_rate(stats, "deliver_get"),
            ack_rate=_rate(stats, "ack"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class _QueuesApi(Management):
    async def queues(self) -> list[QueueStats]:
        """Every ``tillsync.*`` queue of the vhost (registers' queues included)."""
        response = await self._request(
            "GET", f"/api/queues/{quote(self.vhost, safe='')}?columns={_COLUMNS}"
        )
        return [
            QueueStats.from_api(q) for q in response.json() if q["name"].startswith("tillsync.")
        ]


class QueueMonitor:
    """The latest queue stats and a bounded history of depths, per queue."""

    def __init__(self, settings: CentralSettings) -> None:
        self._settings = settings
        self.latest: list[QueueStats] = []
        self.history: dict[str, deque[tuple[float, int]]] = {}
        self.error: str | None = None

    async def sample(self) -> list[QueueStats]:
        """Ask the broker now; keeps the answer (or the error) for the pages."""
        try:
            async with _QueuesApi.from_settings(self._settings) as api:
                queues = await api.queues()  # type: ignore[attr-defined]
        except TillsyncError as exc:
            self.error = exc.reason
            raise
        self.error = None
        now = time.time()
        for queue in queues:
            self.history.setdefault(queue.name, deque(maxlen=HISTORY)).append((now, queue.messages))
        self.latest = sorted(queues, key=lambda q: q.name)
        return self.latest

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.sample()
            except TillsyncError as exc:
                log.warning("queue sample failed", reason=exc.reason)
            try:
                await asyncio.wait_for(stopping.wait(), self._settings.admin_queue_sample_s)
            except TimeoutError:
                pass


def sparkline(points: list[tuple[float, int]], width: int = 240, height: int = 40) -> str:
    """An SVG polyline's ``points`` attribute for depth over time (empty: no data)."""
    if not points:
        return ""
    t0, t1 = points[0][0], points[-1][0]
    top = max(value for _, value in points) or 1
    span = (t1 - t0) or 1.0
    return " ".join(
        f"{(t - t0) / span * width:.1f},{height - value / top * (height - 2) - 1:.1f}"
        for t, value in points
    )
