"""Settle: work owed after changes runs once they pause, never later than its bound."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from qkdagent.settle import Settle


async def test_work_follows_a_pause_in_changes(autojump_clock: trio.testing.MockClock) -> None:
    settle = Settle(bound=10.0, quiet=0.5, min_gap=0.0)
    start = trio.current_time()
    settle.changed()
    await settle.due()
    assert trio.current_time() - start == 0.5


async def test_changes_that_never_pause_wait_only_for_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settle = Settle(bound=3.0, quiet=0.5, min_gap=0.0)
    ran_at: list[float] = []
    start = trio.current_time()

    async def keep_changing() -> None:
        while True:
            settle.changed()
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        settle.changed()
        nursery.start_soon(keep_changing)
        await settle.due()
        ran_at.append(trio.current_time() - start)
        settle.ran()
        nursery.cancel_scope.cancel()
    assert ran_at == [3.0]


async def test_runs_are_min_gap_apart_and_nothing_is_due_without_a_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settle = Settle(bound=10.0, quiet=0.1, min_gap=2.0)
    settle.changed()
    await settle.due()
    settle.ran()
    first = trio.current_time()
    settle.changed()
    await settle.due()
    assert trio.current_time() - first == 2.0
    settle.ran()
    with trio.move_on_after(100) as scope:
        await settle.due()  # no change since: never due
    assert scope.cancelled_caught


async def test_the_bound_counts_from_the_first_change_even_while_work_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Changes that arrive while a slow run is under way wait no longer than the bound
    (counted from their arrival), not the rest of the run and then the bound again."""
    settle = Settle(bound=1.0, quiet=0.02, min_gap=0.02)
    waiting: list[float] = []  # arrival times of changes no run has covered yet
    lateness: list[float] = []

    async def worker() -> None:
        while True:
            await settle.due()
            now = trio.current_time()
            lateness.extend(now - t for t in waiting)
            waiting.clear()
            await trio.sleep(0.5)  # slow work (an fsync on a slow disk)
            settle.ran()

    async def changes() -> None:
        for _ in range(300):
            waiting.append(trio.current_time())
            settle.changed()
            await trio.sleep(0.01)  # never a pause of `quiet`

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await changes()
        nursery.cancel_scope.cancel()
    assert lateness and max(lateness) <= 1.0 + 1e-9


async def test_a_change_does_not_wake_the_waiting_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A change moves the waiting task's deadline: the task runs once, when the work is due,
    not once per change (each wake-up was a pass of the event loop on a rotation's path)."""
    settle = Settle(bound=10.0, quiet=0.5, min_gap=0.0)
    steps: list[trio.lowlevel.Task] = []
    waiter: list[trio.lowlevel.Task] = []

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task in waiter:
                steps.append(task)

    async def wait() -> None:
        waiter.append(trio.lowlevel.current_task())
        await settle.due()

    trio.lowlevel.add_instrument(Steps())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        start, before = trio.current_time(), len(steps)
        for _ in range(5):
            settle.changed()
            await trio.sleep(0.1)
    assert len(steps) - before == 1  # woken once: when due
    assert trio.current_time() - start == pytest.approx(0.4 + 0.5)  # the last change + quiet
