"""The services' garbage-collector settings (``tillsync_agent.process``,
``tillsync_central.process``): the same in both, and what they claim to do; and the
agent's thread switch interval."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator

import pytest

from tillsync_agent import process as agent_process
from tillsync_central import process as central_process


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.parametrize("tune", [agent_process.tune_gc, central_process.tune_gc])
def test_tune_gc_freezes_what_exists_and_raises_the_thresholds(
    tune: Callable[[], None], restored_gc: None
) -> None:
    gc.unfreeze()
    survivor = [object() for _ in range(10)]  # a tracked container made before tuning
    tune()
    assert gc.get_threshold() == (50_000, 20, 100)
    assert gc.get_freeze_count() > 0
    assert gc.is_tracked(survivor)
    # Frozen: out of every generation's scan.
    assert all(tracked is not survivor for tracked in gc.get_objects())


def test_agent_and_central_tune_alike() -> None:
    assert agent_process.GC_THRESHOLDS == central_process.GC_THRESHOLDS


def test_the_agent_shortens_the_switch_interval_and_central_does_not() -> None:
    default = sys.getswitchinterval()
    try:
        agent_process.shorten_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() < default
    finally:
        sys.setswitchinterval(default)
    assert not hasattr(central_process, "shorten_switch_interval")
