"""Adaptive coalescing of concurrent calls to one hub into batches (no timer, no added delay).

An item submitted while no batch is in flight is sent at once, alone; items submitted while one
is in flight queue up and go together, as one batch, as soon as it returns. So a lone call pays
one round trip as before, and under load the batch grows with the load (up to `max_items`),
which is what amortises a request's fixed cost (TLS, HTTP, signature, durable commit) over
many keys.

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
    done: bool = False
    result: R | None = None
    error: str | None = None


class Coalescer(Generic[I, R]):
    """`submit(item)` returns `send`'s result for that item; `send` gets the items of one
    batch and returns one result per item, in order, or raises `BatchFailed`."""

    def __init__(
        self, send: Callable[[list[I]], Awaitable[Sequence[R]]], max_items: int = 64
    ) -> None:
        self._send = send
        self.max_items = max_items
        self._queue: list[_Slot[I, R]] = []
        self._busy = False
        self._turn: _Slot[I, R] | None = None
        self.batches = 0
        """Batches sent (for tests and metrics)."""

    async def submit(self, item: I) -> R:
        slot: _Slot[I, R] = _Slot(item)
        self._queue.append(slot)
        if self._busy:
            try:
                await slot.wake.wait()  # done, or woken to send the next batch
            except BaseException:
                if not slot.done:
                    self._queue.remove(slot)
                    if self._turn is slot:
                        self._pass_turn()
                raise
        if not slot.done:
            await self._lead(slot)
        if slot.error is not None:
            raise BatchFailed(slot.error)
        return slot.result  # type: ignore[return-value]  # set with done, or error is

    async def _lead(self, slot: _Slot[I, R]) -> None:
        self._busy = True
        self._turn = None
        self._queue.remove(slot)
        batch = [slot, *self._queue[: self.max_items - 1]]
        del self._queue[: len(batch) - 1]
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
            self._pass_turn()

    def _pass_turn(self) -> None:
        if self._queue:
            self._turn = self._queue[0]
            self._turn.wake.set()
        else:
            self._turn = None
            self._busy = False


__all__ = ["BatchFailed", "Coalescer"]
