"""`held(lock)`: a free lock is taken without a schedule point; otherwise as `async with`."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from qkdagent.locks import held
from tests.helpers import ScheduleCount


async def test_a_free_lock_is_taken_without_yielding_but_a_cancelled_caller_never_takes_it() -> (
    None
):
    lock = trio.Lock()
    with ScheduleCount() as count:
        async with held(lock):
            assert lock.locked()
    assert count.points == 0 and not lock.locked()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            async with held(lock):
                pytest.fail("entered while cancelled")
    assert not lock.locked()


async def test_a_held_lock_is_waited_for_in_turn() -> None:
    lock = trio.Lock()
    order: list[str] = []

    async def take(name: str) -> None:
        async with held(lock):
            order.append(name)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        await lock.acquire()
        nursery.start_soon(take, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "second")
        await trio.testing.wait_all_tasks_blocked()
        lock.release()  # handed to the first waiter; the second still queues behind it
        async with held(lock):  # queued behind both
            order.append("third")
    assert order == ["first", "second", "third"]


async def test_a_free_rotation_slot_is_taken_without_yielding_and_a_full_limiter_in_turn() -> None:
    """The initiator's rotation slots (`max_parallel_rotations`) are taken the same way."""
    slots = trio.CapacityLimiter(2)
    with ScheduleCount() as count:
        async with held(slots), held(trio.Lock()):
            assert slots.borrowed_tokens == 1
    assert count.points == 0 and slots.borrowed_tokens == 0
    order: list[str] = []
    done = {name: trio.Event() for name in "abcd"}

    async def take(name: str) -> None:
        async with held(slots):
            order.append(name)
            await done[name].wait()

    async with trio.open_nursery() as nursery:
        for name in "abcd":
            nursery.start_soon(take, name)
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b"]  # c and d wait
        done["a"].set()  # a's token goes to c, the first waiter...
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b", "c"]
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                async with held(slots):
                    pytest.fail("entered while cancelled")
        done["b"].set()  # ...and b's to d, not to a newcomer
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b", "c", "d"]
        done["c"].set()
        done["d"].set()
    assert slots.borrowed_tokens == 0
