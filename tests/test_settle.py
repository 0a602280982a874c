"""Settle: work owed after changes runs once they pause, never later than its bound."""

from __future__ import annotations

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
