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
    """Owed work and when it is due. A change moves the waiting task's deadline instead of
    waking it: a wake-up per change was a pass of the event loop on every rotation's path
    (a commit is a change), for a task that only went back to sleep (issue 18)."""

    def __init__(self, *, bound: float, quiet: float, min_gap: float) -> None:
        self.bound = bound
        """Seconds from the first change to the run, at most."""
        self.quiet = quiet
        self.min_gap = min_gap
        self._owed = False
        self._last_change = -math.inf
        self._first_change = -math.inf
        """When the first change not yet covered by a run came."""
        self._last_run = -math.inf
        self._waiting: trio.CancelScope | None = None
        """The waiting task's sleep, whose deadline is when the work is due."""

    def changed(self) -> None:
        """A change that the work must follow (call from the trio thread)."""
        self._last_change = trio.current_time()
        if not self._owed:
            self._first_change = self._last_change
            self._owed = True
        if self._waiting is not None:
            self._waiting.deadline = self._due()

    def _due(self) -> float:
        if not self._owed:
            return math.inf
        latest = self._first_change + self.bound  # even if the previous run took a while
        return settle_time(
            self._last_change, self._last_run, latest, quiet=self.quiet, min_gap=self.min_gap
        )

    async def due(self) -> None:
        """Return when the work for the changes so far should run; call `ran()` after it."""
        while trio.current_time() < self._due():
            with trio.CancelScope(deadline=self._due()) as self._waiting:
                try:
                    await trio.sleep_forever()
                finally:
                    self._waiting = None
        self._owed = False

    def ran(self) -> None:
        self._last_run = trio.current_time()
