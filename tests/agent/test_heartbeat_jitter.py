"""Heartbeats come within the last fifth of the interval, drawn afresh each time: never
late for central's presence, and a fleet that came up together drifts apart."""

from __future__ import annotations

import random
from pathlib import Path

from tillsync_agent import Agent, load_settings
from tillsync_agent.heartbeat import JITTER, Heartbeats


def heartbeats(tmp_path: Path, seed: int) -> Heartbeats:
    settings = load_settings(
        None,
        register_id="r-1",
        center_id="c-1",
        amqp_url="amqp://127.0.0.1:1/",  # never connected: only the waits are drawn
        data_dir=tmp_path,
        heartbeat_interval_s=15.0,
    )
    agent = Agent(settings, serve_socket=False)
    return Heartbeats(
        settings,
        agent.outbox,
        agent.replica,
        agent.history,
        exchange=lambda: None,
        last_error=lambda: None,
        rng=random.Random(seed),
    )


def test_every_wait_is_within_the_last_fifth_of_the_interval(tmp_path: Path) -> None:
    beats = heartbeats(tmp_path, seed=1)
    waits = [beats.next_wait() for _ in range(2000)]
    assert all(15.0 * (1 - JITTER) <= w <= 15.0 for w in waits)
    assert max(waits) - min(waits) > 15.0 * JITTER * 0.9  # the whole fifth is used
    assert len(set(waits)) == len(waits)


def test_registers_that_start_together_drift_apart(tmp_path: Path) -> None:
    """Ten registers up in the same second: after five beats they are seconds apart."""
    fleet = [heartbeats(tmp_path / str(i), seed=i) for i in range(10)]
    at = [sum(beats.next_wait() for _ in range(5)) for beats in fleet]
    assert max(at) - min(at) > 1.0
    assert all(5 * 15.0 * (1 - JITTER) <= t <= 5 * 15.0 for t in at)
