"""One timer task for all links (issue 18): the due-time heap, and running agents with many
links under trio's virtual clock (isolation, fail-closed deadlines, no task per idle link)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qkdagent.scheduler import DueQueue
from qkdagent.testing import open_agent_pair
from tests.helpers import TaskSteps

REC = {"sinks": {"rec": {"type": "recording"}}}
LINK = {"interval": 10, "jitter": 0, "reject_after": 30}


# -- DueQueue (pure) -----------------------------------------------------------------------------


def test_due_queue_pops_due_keys_earliest_first_and_ties_in_insertion_order() -> None:
    queue: DueQueue[str] = DueQueue()
    for key, when in (("c", 3.0), ("a", 1.0), ("b", 1.0), ("d", 9.0)):
        queue.set(key, when)
    assert queue.next_due() == 1.0 and len(queue) == 4
    assert queue.pop_due(0.5) == []
    assert queue.pop_due(3.0) == ["a", "b", "c"]
    assert len(queue) == 1 and queue.when("d") == 9.0 and queue.when("a") is None
    assert queue.pop_due(math.inf) == ["d"]
    assert queue.next_due() == math.inf


def test_setting_a_key_again_supersedes_its_time_and_discard_forgets_it() -> None:
    queue: DueQueue[str] = DueQueue()
    queue.set("a", 5.0)
    queue.set("a", 50.0)  # later: the stale 5.0 entry must not fire
    queue.set("b", 20.0)
    queue.set("b", 2.0)  # earlier
    queue.set("c", 1.0)
    queue.discard("c")
    queue.discard("missing")
    assert queue.next_due() == 2.0
    assert queue.pop_due(10.0) == ["b"]
    assert queue.pop_due(49.0) == []
    assert queue.pop_due(50.0) == ["a"]
    assert len(queue) == 0


def test_the_heap_stays_proportional_to_the_keys_however_often_they_are_set() -> None:
    queue: DueQueue[int] = DueQueue()
    for round_ in range(200):
        for key in range(100):
            queue.set(key, float(round_ * 100 + key))
    assert len(queue) == 100
    assert len(queue._heap) <= 2 * 100 + 64
    assert queue.pop_due(math.inf) == list(range(100))


# -- running agents ------------------------------------------------------------------------------


def many_links(pair: Any, names: list[str], **changes: Any) -> None:
    """Copies of the pair's link under other names, on both sides."""
    for config in pair.configs.values():
        template = config["links"]["alice-bob"]
        for name in names:
            config["links"][name] = {**template, **changes}


async def start(pair: Any) -> None:
    await pair.start("bob")
    await pair.start("alice")


def installs(pair: Any, side: str, link: str) -> list[float]:
    return [r.time for r in pair.sink(side, "rec").installs if r.link == link]


@asynccontextmanager
async def one_link_pair(directory: Path, *, epoch: int) -> AsyncIterator[Any]:
    """The pair with its one link (`LINK`), started, once it committed `epoch`."""
    async with open_agent_pair(
        directory, alice=REC, bob=REC, link=LINK, local=True, start=False
    ) as pair:
        await start(pair)
        await pair.wait_for_epoch(epoch)
        yield pair


def armed_for_reject_after(link: Any) -> bool:
    """Whether the agent's timer is to look at `link` next at its reject_after deadline."""
    deadline = link.clock.last_success + link.config.timing.reject_after
    return bool(link.env.timers._queue.when(link) == deadline)


async def test_a_stuck_link_delays_no_other_link(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qkdagent.link import LinkRuntime

    rotate = LinkRuntime._rotate

    async def stuck_for_one(self: LinkRuntime) -> None:
        if self.name == "stuck":
            await trio.sleep_forever()
        await rotate(self)

    monkeypatch.setattr(LinkRuntime, "_rotate", stuck_for_one)
    async with open_agent_pair(
        tmp_path, alice=REC, bob=REC, link=LINK, local=True, start=False
    ) as pair:
        many_links(pair, ["stuck"])
        await start(pair)
        began = trio.current_time()
        await trio.sleep(95)
        times = [t - began for t in installs(pair, "alice", "alice-bob")]
    assert len(times) == 10  # at 0, 10, ..., 90 although "stuck" never finished its first
    assert all(abs(t - 10 * i) < 1 for i, t in enumerate(times))


async def test_every_link_is_erased_at_its_reject_after_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    names = [f"link{i:02d}" for i in range(40)]
    async with open_agent_pair(
        tmp_path, alice=REC, bob=REC, link=LINK, local=True, start=False
    ) as pair:
        many_links(pair, names)
        names.append("alice-bob")
        await start(pair)
        with trio.fail_after(60):
            while any(pair.bob.link(n).record.epoch < 1 for n in names):  # noqa: ASYNC110
                await trio.sleep(0.5)
        last = {n: installs(pair, "bob", n)[-1] for n in names}
        await pair.stop("alice")  # no more rotations: bob must erase every link on time
        await trio.sleep(40)
        erasures = [e for e in pair.sink("bob", "rec").erasures if e[2] == "reject_after"]
    by_link = {link: when for when, link, _ in erasures}
    assert sorted(by_link) == sorted(names) and len(erasures) == len(names)  # each once
    assert all(0 <= by_link[n] - (last[n] + 30) < 0.5 for n in names)


def task_count() -> int:
    tasks, nurseries = 0, list(trio.lowlevel.current_root_task().child_nurseries)
    while nurseries:
        nursery = nurseries.pop()
        tasks += len(nursery.child_tasks)
        for task in nursery.child_tasks:
            nurseries.extend(task.child_nurseries)
    return tasks


async def idle_tasks(directory: Path, links: int) -> int:
    """Tasks of an agent pair with `links` links, between two rotations."""
    async with open_agent_pair(
        directory, alice=REC, bob=REC, link=LINK, local=True, start=False
    ) as pair:
        many_links(pair, [f"extra{i:03d}" for i in range(links - 1)])
        await start(pair)
        await trio.sleep(5)  # every link rotated once; the next rotations are due at 10
        assert all(pair.alice.link(n).record.epoch == 1 for n in pair.alice.links)
        return task_count()


async def test_an_idle_link_has_no_task_of_its_own(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    one = await idle_tasks(tmp_path / "one", 1)
    many = await idle_tasks(tmp_path / "many", 100)
    assert many == one


async def test_a_bug_in_one_links_timer_is_retried_with_backoff_and_spares_the_others(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qkdagent.link import LinkRuntime

    tick = LinkRuntime.tick
    bugs: list[float] = []

    async def buggy_for_one(self: LinkRuntime) -> float:
        if self.name == "buggy" and self.config.initiator:
            bugs.append(trio.current_time())
            raise KeyError("key 0123abcd")
        return await tick(self)

    monkeypatch.setattr(LinkRuntime, "tick", buggy_for_one)
    async with open_agent_pair(
        tmp_path, alice=REC, bob=REC, link=LINK, local=True, start=False
    ) as pair:
        many_links(pair, ["buggy"])
        await start(pair)
        began = trio.current_time()
        await trio.sleep(95)
        times = installs(pair, "alice", "alice-bob")
        status = pair.alice.link("buggy").describe()
    assert len(times) == 10
    gaps = [round(b - a) for a, b in itertools.pairwise(bugs)]
    assert gaps[:6] == [1, 2, 4, 8, 16, 32] and bugs[0] - began < 1
    assert status["last_error"] == "internal: unexpected KeyError" and status["epoch"] == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("link buggy: unexpected KeyError" in line for line in lines) == len(bugs)
    assert not any("0123abcd" in line for line in lines)


async def test_links_due_at_once_wait_at_the_gate_not_as_tasks(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    slow = {"sinks": {"rec": {"type": "recording", "delay": 0.5}}, "agent": {}}
    slow["agent"]["max_parallel_rotations"] = 3
    names = [f"link{i:03d}" for i in range(60)]
    async with open_agent_pair(
        tmp_path,
        alice=slow,
        bob=REC,
        link={**LINK, "interval": 600, "reject_after": 900},
        local=True,
        start=False,
    ) as pair:
        many_links(pair, names)
        await pair.start("bob")
        idle = task_count()
        await pair.start("alice")
        most = 0
        while any(pair.alice.link(n).record.epoch < 1 for n in pair.alice.links):
            most = max(most, task_count() - idle)
            await trio.sleep(0.1)
        rotated = [n for n in pair.alice.links if pair.alice.link(n).record.epoch == 1]
    assert len(rotated) == 61
    assert most < 40  # 61 links due at once; without the gate each had a task from the start


async def test_a_responders_commit_costs_the_agents_timer_no_pass(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """After a commit the responder's link decides at once when it must look again (its
    reject_after deadline, moved on), and the agent's timer, asleep until the old deadline,
    sleeps on to the new one: it is never woken for the link. (It was, once per rotation: a
    pass of the loop and a cancel scope's expiry each.)"""
    async with one_link_pair(tmp_path, epoch=1) as pair:
        bob = pair.bob.link("alice-bob")
        with TaskSteps() as steps:
            await trio.sleep(10 * LINK["interval"])  # past reject_after three times over
        armed = armed_for_reject_after(bob)
        passes = {  # (while the tasks run: a finished coroutine has no frame)
            frame.f_locals["self"]: n
            for task, n in steps.by_task.items()
            if task.name.endswith("Timers.run") and (frame := task.coro.cr_frame) is not None
        }
    assert bob.record.epoch == 11
    assert bob.env.timers not in passes  # bob's timer task was never woken
    assert passes[pair.alice.link("alice-bob").env.timers] > 0  # (found as alice's is)
    assert armed


async def test_a_timer_asleep_for_an_item_that_moved_later_sleeps_on_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`wake_at` with a later time for the item the timer task sleeps for moves its sleep to
    the next due item (one wake-up, at the right time, instead of one for nothing first); an
    earlier time wakes it sooner, as before."""
    from qkdagent.timers import LinkTimers

    woken: list[tuple[str, float]] = []

    class Item:
        def __init__(self, name: str) -> None:
            self.name = name

        def due(self) -> None:
            woken.append((self.name, trio.current_time()))

        def begin_gated(self) -> bool:
            return False

    timers = LinkTimers()
    a, b, c = Item("a"), Item("b"), Item("c")
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        start = trio.current_time()
        timers.wake_at(a, start + 5)
        timers.wake_at(b, start + 8)
        await trio.testing.wait_all_tasks_blocked()
        with TaskSteps() as steps:
            timers.wake_at(a, start + 20)  # later: the sleep moves on to b's time
            timers.wake_at(c, start + 3)  # earlier: the sleep comes sooner
            await trio.sleep(30)
        timers.stop()
    assert [(name, t - start) for name, t in woken] == [("c", 3), ("b", 8), ("a", 20)]
    assert steps.of_tasks_named("Timers.run") == 3


async def test_a_bug_deciding_after_a_commit_leaves_the_commit_and_the_decision_to_the_timer(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the decision a responder makes after its commit fails nothing: the commit
    stands and is installed, the bug is logged by type only (its message might quote a key),
    and the agent's timer decides again at once."""
    from qkdagent.link import LinkRuntime

    due = LinkRuntime.due
    calls: list[tuple[int, float]] = []  # bob's decisions: (epoch, when)

    def buggy_once(self: LinkRuntime) -> None:
        if not self.config.initiator:
            calls.append((self.record.epoch, trio.current_time()))
            if calls[-1][0] == 1 and calls.count(calls[-1]) == 1:  # its first commit's
                raise KeyError("key 0123abcd")
        due(self)

    monkeypatch.setattr(LinkRuntime, "due", buggy_once)
    async with one_link_pair(tmp_path, epoch=3) as pair:
        bob = pair.bob.link("alice-bob")
        armed = armed_for_reject_after(bob)
    first = next(i for i, (epoch, _) in enumerate(calls) if epoch == 1)
    assert calls[first + 1] == calls[first]  # the timer decided again, at once
    assert bob.status.failures == 0
    assert installs(pair, "bob", "alice-bob")[0] == calls[first][1]  # the commit stood
    assert armed
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == ["link alice-bob: deciding what is next raised KeyError (a bug)"]
