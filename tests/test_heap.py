"""gateway/heap.py: what startup built is out of the collector's sight, and the young generation waits longer."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from gateway.heap import YOUNG_THRESHOLD, settle_startup_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector can free it


@pytest.mark.usefixtures("restored_gc")
def test_startup_objects_are_frozen_startup_garbage_is_collected_and_the_young_threshold_is_raised() -> None:
    gc.collect()
    kept = _Node()
    garbage = _Node()
    collected = weakref.ref(garbage)
    del garbage
    _, middle, old = gc.get_threshold()

    with capture_logs() as logs:
        frozen = settle_startup_heap()

    assert frozen > 0
    assert id(kept) not in {id(o) for o in gc.get_objects()}  # in the permanent generation: never walked
    assert collected() is None  # startup's cyclic garbage was collected first, not frozen
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)
    assert logs == [
        {
            "event": "runtime.heap_settled",
            "frozen": frozen,
            "thresholds": [YOUNG_THRESHOLD, middle, old],
            "log_level": "info",
        }
    ]
    after = _Node()
    assert id(after) in {id(o) for o in gc.get_objects()}  # what comes later is collected as usual
