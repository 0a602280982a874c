"""`settle_heap`: the start-up heap leaves the cyclic collector's work, and a reload's thaw lets
what it replaced (links hold reference cycles) be collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from qkdagent.heap import settle_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def thawed() -> Iterator[None]:
    """This process runs many agents: nothing frozen here may outlive the test."""
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_settling_freezes_what_lives_and_collects_what_does_not(thawed: None) -> None:
    live, dead = Node(), Node()
    dead_ref = weakref.ref(dead)
    del dead
    frozen = settle_heap()
    assert dead_ref() is None  # collected before the freeze
    assert frozen == gc.get_freeze_count() > 0
    assert not any(o is live for o in gc.get_objects())  # out of every generation


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
