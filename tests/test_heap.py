"""`settle_heap`: the start-up heap leaves the cyclic collector's work, and a reload's thaw lets
what it replaced (links hold reference cycles) be collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdagent.heap import YOUNG_THRESHOLD, settle_heap
from qkdagent.testing import open_agent_pair
from qkdagent.testing.agents import LINK


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def thawed() -> Iterator[None]:
    """This process runs many agents: nothing frozen here may outlive the test."""
    gc.unfreeze()
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_settling_freezes_what_lives_and_collects_what_does_not(thawed: None) -> None:
    live, dead = Node(), Node()
    dead_ref = weakref.ref(dead)
    del dead
    frozen = settle_heap()
    assert dead_ref() is None  # collected before the freeze
    assert frozen == gc.get_freeze_count() > 0
    assert not any(o is live for o in gc.get_objects())  # out of every generation
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD


def test_a_frozen_cycle_is_freed_only_by_a_thawing_settle(thawed: None) -> None:
    old = Node()  # a link a reload will replace
    old_ref = weakref.ref(old)
    settle_heap()
    del old
    gc.collect()
    assert old_ref() is not None  # frozen: the collector does not see it
    settle_heap()
    assert old_ref() is not None
    settle_heap(thaw=True)
    assert old_ref() is None


async def test_rotations_over_https_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    """What `settle_heap` leaves to the collector is what rotations make; if a rotation made
    reference cycles (a parser and its callbacks, one per reply: issue 18), each collection
    of the oldest generation would walk them, hundreds of milliseconds at 10,000 links."""
    async with open_agent_pair(tmp_path) as pair:
        link = pair.alice.link(LINK)
        assert await link.rotate_once()  # connections opened, caches filled
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                assert await link.rotate_once()
            found = gc.collect()
        finally:
            gc.enable()
        assert found == 0
