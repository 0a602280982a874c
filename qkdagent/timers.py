"""The agent's link timers: one task and one heap of due times wake every native link, and a
gate of `max_parallel_rotations` places admits their rotation work (issue 18)."""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from . import scheduler

log = logging.getLogger(__name__)


class Timed(Protocol):
    def due(self) -> None:
        """Its time has come. Called by the timer task (and by a link after its commit, to
        decide at once what is due next): must not block."""

    def begin_gated(self) -> bool:
        """Its turn at the gate: start the queued work (and `release()` when it ends), or
        return False if it no longer waits."""


class LinkTimers:
    """One task wakes each link when its timer is due, from one heap of due times (issue 18:
    a sleeping task, cancel scope and event per link were a large part of what 10,000 links
    cost). A link's work then runs in a task of its own (`spawn`), so a slow or failing link
    never delays another's.

    Work that needs a rotation slot passes a gate of `limit` (the agent's
    `max_parallel_rotations`): the links beyond it wait in a queue, not as tasks parked on the
    slots, so 10,000 links due at once (start-up) cost no task each. A slow rotation holds its
    place as it holds its slot, no longer than the rotation timeout."""

    def __init__(self, limit: int = 64) -> None:
        self._queue: scheduler.DueQueue[Timed] = scheduler.DueQueue()
        self._stopped = trio.Event()
        self._sleep: trio.CancelScope | None = None
        """The timer task's wait for the earliest due time, while it waits: an earlier wake-up
        moves its deadline (no task step, where waking the task to re-arm cost one)."""
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self.limit = limit
        self._gated = 0
        self._waiting: collections.deque[Timed] = collections.deque()

    def wake_at(self, item: Timed, when: float) -> None:
        sleep = self._sleep
        if sleep is None:  # the task reads the queue before it waits again
            self._queue.set(item, when)
            return
        before = self._queue.when(item)
        self._queue.set(item, when)
        if when < sleep.deadline:
            sleep.deadline = when
        elif before == sleep.deadline and when > before:
            # the task sleeps until this item's old time: it sleeps on to the next one instead
            # of waking for nothing (a responder's link moves its reject_after deadline on at
            # every commit, later than the one the task went to sleep for)
            sleep.deadline = self._queue.next_due()

    def discard(self, item: Timed) -> None:
        self._queue.discard(item)

    def spawn(self, work: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a link's work in a task of its own (the agent waits for it when it stops)."""
        if self._nursery is None:
            raise RuntimeError("the link timers are not running")
        self._nursery.start_soon(work, *args)

    def enqueue(self, item: Timed) -> None:
        """`item.begin_gated()` when the gate has room (at once if it has now)."""
        self._waiting.append(item)
        self._admit()

    def release(self) -> None:
        """Gated work ended: its place goes to the next in the queue."""
        self._gated -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self._gated < self.limit:
            item = self._waiting.popleft()
            try:
                started = item.begin_gated()
            except Exception as exc:  # a bug in one link must not stop the queue
                log.error("a link's timer raised %s (a bug)", type(exc).__name__)
                continue
            if started:
                self._gated += 1

    def stop(self) -> None:
        """No more wake-ups: `run` returns once the work under way has ended."""
        self._stopping = True
        self._stopped.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while not self._stopping:
                with trio.move_on_at(self._queue.next_due()) as self._sleep:
                    await self._stopped.wait()
                self._sleep = None
                for item in self._queue.pop_due(trio.current_time()):
                    try:
                        item.due()
                    except Exception as exc:  # a bug in one link must not stop all timers
                        log.error("a link's timer raised %s (a bug)", type(exc).__name__)
