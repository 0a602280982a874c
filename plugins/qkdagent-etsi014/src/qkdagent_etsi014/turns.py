"""Turns of the shared calls to one SAE: at most `at_once` under way, so the links that ask
meanwhile wait and share the next call rather than each sending its own; a call that has been
under way for `stall` seconds stops holding the others back (a KME slow to answer one call, or a
dead kept-alive connection, must not hold up every link to that SAE until its deadline)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

AT_ONCE = 2
"""More than one, so one slow call does not hold up the rest before it counts as stalled."""
STALL = 0.2
"""As the peer client's batches (`qkdagent.peerbatch.STALL`): a KME answers in milliseconds."""


class Turns:
    """The turns of one SAE's shared calls of one kind (`turn()` around each call)."""

    def __init__(self, at_once: int = AT_ONCE, stall: float = STALL) -> None:
        self.at_once = at_once
        self.stall = stall
        self._started: dict[object, float] = {}
        """The calls under way (a token each) and when each took its turn."""
        self._changed = trio.Event()

    def fresh(self, now: float) -> list[float]:
        """When the calls under way that still hold the others back took their turns."""
        return [t for t in self._started.values() if t + self.stall > now]

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait until fewer than `at_once` fresh calls are under way; hold a turn meanwhile."""
        while True:
            now = trio.current_time()
            fresh = self.fresh(now)
            if len(fresh) < self.at_once:
                break
            with trio.move_on_at(min(fresh) + self.stall):
                await self._changed.wait()
        token = object()
        self._started[token] = now
        try:
            yield
        finally:
            del self._started[token]
            self._changed.set()
            self._changed = trio.Event()
