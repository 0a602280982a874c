"""Background work owed after changes (a WAL checkpoint, an fsync of installed files), run once
the changes pause: between rotations rather than in the middle of the next one, and shared by
a burst of changes, yet never later than a bound after the first change."""

from __future__ import annotations

import math

import trio


def settle_time(
    last_change: float, last_run: float, latest: float, *, quiet: float, min_gap: float
) -> float:
    """When the owed work should run: once changes have paused for `quiet` (and `min_gap`
    after the previous run), at the latest at `latest`."""
    return min(latest, max(last_change + quiet, last_run + min_gap))


class Settle:
    def __init__(self, *, bound: float, quiet: float, min_gap: float) -> None:
        self.bound = bound
        """Seconds from the first change to the run, at most."""
        self.quiet = quiet
        self.min_gap = min_gap
        self._owed = trio.Event()
        self._last_change = -math.inf
        self._first_change = -math.inf
        """When the first change not yet covered by a run came."""
        self._last_run = -math.inf

    def changed(self) -> None:
        """A change that the work must follow (call from the trio thread)."""
        self._last_change = trio.current_time()
        if not self._owed.is_set():
            self._first_change = self._last_change
            self._owed.set()

    async def due(self) -> None:
        """Return when the work for the changes so far should run; call `ran()` after it."""
        await self._owed.wait()
        latest = self._first_change + self.bound  # even if the previous run took a while
        while True:
            due = settle_time(
                self._last_change,
                self._last_run,
                latest,
                quiet=self.quiet,
                min_gap=self.min_gap,
            )
            if trio.current_time() >= due:
                break
            await trio.sleep_until(due)
        self._owed = trio.Event()

    def ran(self) -> None:
        self._last_run = trio.current_time()
