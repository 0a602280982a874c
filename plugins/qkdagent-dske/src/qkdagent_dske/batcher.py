"""Adaptive coalescing of concurrent calls to one hub into batches (no timer, no added delay).

An item submitted while no batch is in flight is sent at once, alone; items submitted while one
is in flight queue up and go together, as one batch, as soon as it returns. So a lone call pays
one round trip as before, and under load the batch grows with the load (up to `max_items`),
which is what amortises a request's fixed cost (TLS, HTTP, signature, durable commit) over
many keys. A full queue (`max_items` waiting) is sent at once, beside the batch in flight (at
most `max_in_flight` at a time), so the bound on a batch does not bound the throughput.

Each batch is sent in a task of the nursery `serve()` runs (the owner's background task), never
in a caller's task: a hub deletes a share once it has delivered it, so a caller's timeout must
not cut short a batch that holds other callers' items. A cancelled caller abandons only its own
wait: if its item is still queued it leaves the queue, if it is in a batch its result goes to
`orphan` when the batch returns (the owner keeps what it can for a retry).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")

log = logging.getLogger("qkdagent.dske")


class BatchFailed(Exception):
    """The batch an item went in failed as a whole (the hub unreachable, a bad answer)."""


@dataclass(eq=False)
class _Slot(Generic[I, R]):
    item: I
    done: trio.Event = field(default_factory=trio.Event)
    abandoned: bool = False
    """Its caller left (cancelled) while it was in a batch."""
    result: R | None = None
    error: str | None = None


class Coalescer(Generic[I, R]):
    """`submit(item)` returns `send`'s result for that item; `send` gets the items of one
    batch and returns one result per item, in order, or raises `BatchFailed`. Batches are sent
    only while `serve()` runs; `submit` raises `BatchFailed` otherwise."""

    def __init__(
        self,
        send: Callable[[list[I]], Awaitable[Sequence[R]]],
        max_items: int = 64,
        max_in_flight: int = 4,
        orphan: Callable[[I, R], None] | None = None,
    ) -> None:
        self._send = send
        self._orphan = orphan
        self.max_items = max_items
        self.max_in_flight = max_in_flight
        self._queue: list[_Slot[I, R]] = []
        self._in_flight = 0
        self._nursery: trio.Nursery | None = None
        self.batches = 0
        """Batches sent (for tests and metrics)."""

    @property
    def serving(self) -> bool:
        return self._nursery is not None

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not yet in one)."""
        return len(self._queue)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches in tasks of this call's nursery until cancelled; then fail what queued."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for slot in self._queue:
                slot.error = "the source's task stopped"
                slot.done.set()
            self._queue.clear()

    async def submit(self, item: I) -> R:
        if self._nursery is None:
            raise BatchFailed("no task sends batches (the source is not running)")
        slot: _Slot[I, R] = _Slot(item)
        self._queue.append(slot)
        full = len(self._queue) >= self.max_items and self._in_flight < self.max_in_flight
        if not self._in_flight or full:
            self._start()
        try:
            await slot.done.wait()
        except BaseException:
            if slot in self._queue:  # not in a batch yet: just leave
                self._queue.remove(slot)
            elif not slot.done.is_set():  # in flight: its result goes to `orphan`
                slot.abandoned = True
            elif slot.result is not None and self._orphan is not None:  # done, not taken
                self._orphan(slot.item, slot.result)
            raise
        if slot.error is not None:
            raise BatchFailed(slot.error)
        return slot.result  # type: ignore[return-value]  # set with done, or error is

    def _start(self) -> None:
        """Send the head of the queue (at most `max_items`) as one batch, in its own task."""
        assert self._nursery is not None
        batch = self._queue[: self.max_items]
        del self._queue[: len(batch)]
        self._in_flight += 1
        self.batches += 1
        self._nursery.start_soon(self._run, batch)

    async def _run(self, batch: list[_Slot[I, R]]) -> None:
        try:
            results = await self._send([s.item for s in batch])
            if len(results) != len(batch):
                raise BatchFailed("one result per item was expected")
            for s, result in zip(batch, results, strict=True):
                s.result = result
        except BatchFailed as exc:
            for s in batch:
                s.error = str(exc)
        except Exception as exc:  # a bug: this batch fails, the owner's task and others go on
            log.error("a batch failed (%s)", type(exc).__name__)
            for s in batch:
                s.error = f"the batch failed ({type(exc).__name__})"
        finally:
            cut = False
            for s in batch:
                if s.result is None and s.error is None:  # cancelled: the owner stops
                    s.error = "the batch was not completed"
                    cut = True
                s.done.set()
                if s.abandoned and s.result is not None and self._orphan is not None:
                    self._orphan(s.item, s.result)
            self._in_flight -= 1
            if self._nursery is not None and not cut:
                if self._queue:  # what queued meanwhile goes now
                    self._start()
                while len(self._queue) >= self.max_items and self._in_flight < self.max_in_flight:
                    self._start()


__all__ = ["BatchFailed", "Coalescer"]
