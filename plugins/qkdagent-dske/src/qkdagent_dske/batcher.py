"""Adaptive coalescing of concurrent calls to one hub into batches (no timer, no added delay).

An item submitted while no batch is in flight is sent at once, alone; items submitted while one
is in flight queue up and go together, as one batch, as soon as it returns. So a lone call pays
one round trip as before, and under load the batch grows with the load (up to `max_items`),
which is what amortises a request's fixed cost (TLS, HTTP, signature, durable commit) over
many keys. A full queue (`max_items` waiting) is sent at once, beside the batch in flight (at
most `max_in_flight` at a time), so the bound on a batch does not bound the throughput.

The caller whose item heads the queue sends the batch (no background task): when it is done,
the head of what queued meanwhile is woken to send the next. A caller cancelled while queued
leaves the queue (handing the turn on if it had it); one cancelled while its batch is in flight
fails the other items of that batch with `BatchFailed`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class BatchFailed(Exception):
    """The batch an item went in failed as a whole (the hub unreachable, a bad answer)."""


@dataclass(eq=False)
class _Slot(Generic[I, R]):
    item: I
    wake: trio.Event = field(default_factory=trio.Event)
    taken: bool = False
    """In a batch (sent or being sent)."""
    done: bool = False
    result: R | None = None
    error: str | None = None


class Coalescer(Generic[I, R]):
    """`submit(item)` returns `send`'s result for that item; `send` gets the items of one
    batch and returns one result per item, in order, or raises `BatchFailed`."""

    def __init__(
        self,
        send: Callable[[list[I]], Awaitable[Sequence[R]]],
        max_items: int = 64,
        max_in_flight: int = 4,
    ) -> None:
        self._send = send
        self.max_items = max_items
        self.max_in_flight = max_in_flight
        self._queue: list[_Slot[I, R]] = []
        self._in_flight = 0
        self._turn: _Slot[I, R] | None = None
        """The queued caller woken to send the next batch (counts as in flight)."""
        self.batches = 0
        """Batches sent (for tests and metrics)."""

    async def submit(self, item: I) -> R:
        slot: _Slot[I, R] = _Slot(item)
        self._queue.append(slot)
        busy = self._in_flight + (self._turn is not None)
        full = len(self._queue) >= self.max_items and busy < self.max_in_flight
        if busy and not full:
            try:
                while True:  # done, or woken to send the next batch (unless taken since)
                    await slot.wake.wait()
                    if slot.done or not slot.taken:
                        break
            except BaseException:
                if not slot.taken:
                    self._queue.remove(slot)
                    if self._turn is slot:
                        self._turn = None
                        self._pass_turn()
                raise
        if not slot.done:
            await self._lead(slot)
        if slot.error is not None:
            raise BatchFailed(slot.error)
        return slot.result  # type: ignore[return-value]  # set with done, or error is

    async def _lead(self, slot: _Slot[I, R]) -> None:
        if self._turn is slot:
            self._turn = None
        self._in_flight += 1
        self._queue.remove(slot)
        batch = [slot, *self._queue[: self.max_items - 1]]
        del self._queue[: len(batch) - 1]
        for s in batch:
            s.taken = True
            if s is self._turn:  # woken to send, taken by a full batch first: wait for it
                self._turn = None
                s.wake = trio.Event()
        self.batches += 1
        try:
            results = await self._send([s.item for s in batch])
            if len(results) != len(batch):
                raise BatchFailed("one result per item was expected")
            for s, result in zip(batch, results, strict=True):
                s.result = result
        except BatchFailed as exc:
            for s in batch:
                s.error = str(exc)
        finally:
            for s in batch:
                if s.result is None and s.error is None:  # the sender was cancelled
                    s.error = "the batch was not completed"
                s.done = True
                s.wake.set()
            self._in_flight -= 1
            self._pass_turn()

    def _pass_turn(self) -> None:
        """Wake the head of the queue to send it, unless one is woken already."""
        if self._queue and self._turn is None:
            self._turn = self._queue[0]
            self._turn.wake.set()


__all__ = ["BatchFailed", "Coalescer"]
