"""The coalescer under concurrency, driven step by step (no sleeps): a lone call goes at once,
calls made while a batch is in flight go together when it returns, a full queue goes beside
it, failures and cancellations reach exactly the callers they concern."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing
from qkdagent_dske.batcher import BatchFailed, Coalescer


class Hub:
    """A fake sender: records each batch and answers it when the test opens its gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[trio.Event] = []
        self.fail: str | None = None

    async def send(self, items: list[int]) -> Sequence[str]:
        self.batches.append(list(items))
        gate = trio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail:
            raise BatchFailed(self.fail)
        return [f"r{i}" for i in items]


async def call(coalescer: Coalescer[int, str], item: int, out: dict[int, str]) -> None:
    try:
        out[item] = await coalescer.submit(item)
    except BatchFailed as exc:
        out[item] = f"failed: {exc}"


async def served(nursery: trio.Nursery, coalescer: Coalescer[int, str]) -> Coalescer[int, str]:
    """The coalescer with its batch task running (as the source's run() does)."""
    await nursery.start(coalescer.serve)
    return coalescer


async def test_a_lone_call_goes_at_once_and_the_rest_queue_for_one_batch(
    nursery: trio.Nursery,
) -> None:
    hub, out = Hub(), {}
    coalescer = await served(nursery, Coalescer(hub.send, max_items=64))
    nursery.start_soon(call, coalescer, 1, out)
    await trio.testing.wait_all_tasks_blocked()
    assert hub.batches == [[1]]  # no timer: sent before anything else happened
    for i in range(2, 7):
        nursery.start_soon(call, coalescer, i, out)
    await trio.testing.wait_all_tasks_blocked()
    assert hub.batches == [[1]]  # queued behind the one in flight
    hub.gates[0].set()
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(hub.batches[1]) == [2, 3, 4, 5, 6] and len(hub.batches) == 2
    assert out == {1: "r1"}
    hub.gates[1].set()
    await trio.testing.wait_all_tasks_blocked()
    assert out == {i: f"r{i}" for i in range(1, 7)} and coalescer.batches == 2


async def test_a_full_queue_goes_beside_the_batch_in_flight(nursery: trio.Nursery) -> None:
    hub, out = Hub(), {}
    coalescer = await served(nursery, Coalescer(hub.send, max_items=3, max_in_flight=2))
    for i in range(1, 8):
        nursery.start_soon(call, coalescer, i, out)
        await trio.testing.wait_all_tasks_blocked()
    # 1 alone; 2, 3, 4 filled the queue and went at once; 5, 6, 7 wait (2 in flight)
    assert hub.batches == [[1], [2, 3, 4]]
    hub.gates[1].set()
    await trio.testing.wait_all_tasks_blocked()
    assert hub.batches == [[1], [2, 3, 4], [5, 6, 7]]
    for gate in (hub.gates[0], hub.gates[2]):
        gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert out == {i: f"r{i}" for i in range(1, 8)}


async def test_a_failed_batch_fails_its_items_only(nursery: trio.Nursery) -> None:
    hub, out = Hub(), {}
    coalescer = await served(nursery, Coalescer(hub.send))
    for i in (1, 2, 3):
        nursery.start_soon(call, coalescer, i, out)
        await trio.testing.wait_all_tasks_blocked()
    hub.fail = "hub down"
    hub.gates[0].set()
    await trio.testing.wait_all_tasks_blocked()
    assert out == {1: "failed: hub down"} and hub.batches[1] == [2, 3]
    hub.fail = None
    hub.gates[1].set()
    await trio.testing.wait_all_tasks_blocked()
    assert out == {1: "failed: hub down", 2: "r2", 3: "r3"}


async def test_a_cancelled_caller_abandons_only_its_own_wait(nursery: trio.Nursery) -> None:
    """Queued, it leaves the queue; in a batch in flight, the batch goes on for the others and
    its result goes to `orphan` (a hub deletes what it delivered: the owner keeps it)."""
    hub, out = Hub(), {}
    orphans: list[tuple[int, str]] = []
    coalescer = await served(
        nursery, Coalescer(hub.send, orphan=lambda i, r: orphans.append((i, r)))
    )
    scopes = {i: trio.CancelScope() for i in range(1, 5)}

    async def cancellable(i: int) -> None:
        with scopes[i]:
            await call(coalescer, i, out)

    for i in range(1, 5):
        nursery.start_soon(cancellable, i)
        await trio.testing.wait_all_tasks_blocked()
    scopes[2].cancel()  # queued: it just leaves
    await trio.testing.wait_all_tasks_blocked()
    assert coalescer.queued == 2
    hub.gates[0].set()
    await trio.testing.wait_all_tasks_blocked()
    assert hub.batches == [[1], [3, 4]] and out == {1: "r1"}
    scopes[3].cancel()  # 3 was first in the batch in flight: it leaves, the batch goes on
    await trio.testing.wait_all_tasks_blocked()
    assert out == {1: "r1"} and not orphans and len(hub.batches) == 2
    hub.gates[1].set()
    await trio.testing.wait_all_tasks_blocked()
    assert out == {1: "r1", 4: "r4"} and orphans == [(3, "r3")]
    nursery.start_soon(call, coalescer, 5, out)  # the coalescer is usable afterwards
    await trio.testing.wait_all_tasks_blocked()
    hub.gates[2].set()
    await trio.testing.wait_all_tasks_blocked()
    assert out[5] == "r5" and hub.batches[2] == [5]


async def test_without_its_task_nothing_is_sent_and_stopping_it_fails_every_wait(
    nursery: trio.Nursery,
) -> None:
    hub, out = Hub(), {}
    coalescer = Coalescer(hub.send)
    with pytest.raises(BatchFailed, match="not running"):
        await coalescer.submit(1)
    task = trio.CancelScope()

    async def serve() -> None:
        with task:
            await coalescer.serve()

    nursery.start_soon(serve)
    await trio.testing.wait_all_tasks_blocked()
    for i in (1, 2):  # 1 in flight, 2 queued
        nursery.start_soon(call, coalescer, i, out)
        await trio.testing.wait_all_tasks_blocked()
    task.cancel()  # the source's run() stops (shutdown, reload)
    await trio.testing.wait_all_tasks_blocked()
    assert out == {1: "failed: the batch was not completed", 2: "failed: the source's task stopped"}
    assert not coalescer.serving and hub.batches == [[1]]


async def test_results_must_match_items(nursery: trio.Nursery) -> None:
    async def short(items: list[int]) -> Sequence[str]:
        return []

    coalescer = await served(nursery, Coalescer(short))
    with pytest.raises(BatchFailed, match="one result per item"):
        await coalescer.submit(1)


async def test_no_batch_exceeds_max_items_however_long_the_queue(nursery: trio.Nursery) -> None:
    """With every place in flight taken, the queue grows past `max_items`; as places free up
    it leaves in batches of at most `max_items`, each in queue order, every item answered once."""
    hub, out = Hub(), {}
    coalescer = await served(nursery, Coalescer(hub.send, max_items=3, max_in_flight=2))
    for i in range(1, 13):
        nursery.start_soon(call, coalescer, i, out)
        await trio.testing.wait_all_tasks_blocked()
    assert hub.batches == [[1], [2, 3, 4]] and coalescer.queued == 8  # saturated
    while len(out) < 12:
        for gate in hub.gates:
            gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert all(len(batch) <= 3 for batch in hub.batches)
    # each batch a run of the queue in order (batches freed together start in either order)
    assert all(batch == list(range(batch[0], batch[0] + len(batch))) for batch in hub.batches)
    assert sorted(i for batch in hub.batches for i in batch) == list(range(1, 13))
    assert out == {i: f"r{i}" for i in range(1, 13)} and coalescer.queued == 0
