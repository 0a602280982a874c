"""When a short blocking call (an SQLite commit, a small file rename) may run on the event loop.

A hop to a worker thread and back costs 0.3-0.5 ms of wall time and about as much CPU when the
thread was idle (two cold wake-ups), more than the call itself on a fast disk: on the rotation
path that was a third of the latency. Blocking the loop is only acceptable while the calls stay
short, so the gate watches how long they take: a call over `limit` sends the following calls
to a worker thread for `cooldown` seconds (while they are measured there too), after which the
loop is tried again. A disk that is always slow therefore costs one slow call per cooldown on
the loop, at most.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")

LIMIT = 0.002
"""Seconds a call may take and still be run on the event loop next time."""
COOLDOWN = 30.0
"""Seconds calls stay on worker threads after one took longer than LIMIT."""


class InlineGate:
    def __init__(self, limit: float = LIMIT, cooldown: float = COOLDOWN) -> None:
        self.limit = limit
        self.cooldown = cooldown
        self._threaded_until = -1.0
        self.inline_calls = 0
        self.threaded_calls = 0

    def inline(self) -> bool:
        """Whether the next call may block the loop."""
        return time.monotonic() >= self._threaded_until

    def measured(self, seconds: float) -> None:
        """Record how long a call took (wherever it ran)."""
        if seconds > self.limit:
            self._threaded_until = time.monotonic() + self.cooldown

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the loop while calls are short, else on a worker thread (never
        abandoned: a cancelled caller still waits for a started call to finish)."""
        if self.inline():
            await trio.lowlevel.checkpoint_if_cancelled()
            self.inline_calls += 1
            started = time.perf_counter()
            try:
                return fn()
            finally:
                self.measured(time.perf_counter() - started)
                await trio.lowlevel.cancel_shielded_checkpoint()
        self.threaded_calls += 1
        return await trio.to_thread.run_sync(self._timed, fn)

    def _timed(self, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return fn()
        finally:
            self.measured(time.perf_counter() - started)
