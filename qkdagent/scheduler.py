"""When to rotate, when to give up and erase: pure functions of (link timing, now).

Times are trio clock seconds, so the running agent can be tested under a virtual clock and these
functions without any clock at all. `DueQueue` holds every link's next wake-up in one heap, so
one task can serve all links' timers.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, replace
from typing import Generic, TypeVar


@dataclass(frozen=True)
class Timing:
    """A link's timer settings (from its config)."""

    interval: float = 120.0
    jitter: float = 0.1
    """Fraction of `interval` by which a rotation may come early (spreads load over links)."""
    reject_after: float = 180.0
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    grid: float = 0.0
    """Regular rotations start on multiples of this many seconds (0: whenever due), so that
    links whose rotations fall close together rotate together and their requests to a peer
    share batches (issue 18). A rotation comes at most this much later."""


@dataclass(frozen=True)
class Clock:
    """What the scheduler remembers about one link."""

    initiator: bool
    last_success: float
    """Time of the last committed rotation, or of start-up before the first one."""
    next_attempt: float
    failures: int = 0
    erased: bool = False
    """True while the sinks hold an erased (random) secret, until the next success."""
    starved_reported: bool = False
    """A responder said once that nothing arrived for reject_after (until the next success)."""
    erase_retry_at: float | None = None
    """When a failed fail-closed erase is tried again (None: no erase is outstanding)."""
    erase_failures: int = 0


@dataclass(frozen=True)
class Wait:
    until: float


@dataclass(frozen=True)
class Rotate:
    pass


@dataclass(frozen=True)
class Erase:
    reason: str


@dataclass(frozen=True)
class Starved:
    """A responder heard no rotation for reject_after: it cannot rotate itself, so it reports
    it once (both sides set to responder looks exactly like this)."""


@dataclass(frozen=True)
class RetryErase:
    """An erase failed for some sinks: try those again (a stale key must really go)."""


Action = Wait | Rotate | Erase | RetryErase | Starved


def decide(clock: Clock, timing: Timing, now: float) -> Action:
    """The one thing to do next. Erasing beats rotating: a stale key must not outlive its bound."""
    deadline = clock.last_success + timing.reject_after
    if not clock.erased and now >= deadline:
        return Erase("reject_after")
    if clock.erase_retry_at is not None and now >= clock.erase_retry_at:
        return RetryErase()
    starving = not clock.initiator and not clock.starved_reported
    if starving and now >= deadline:
        return Starved()
    if clock.initiator and now >= clock.next_attempt:
        return Rotate()
    wake = math.inf
    if clock.initiator:
        wake = clock.next_attempt
    if not clock.erased or starving:
        wake = min(wake, deadline)
    if clock.erase_retry_at is not None:
        wake = min(wake, clock.erase_retry_at)
    return Wait(wake)


def start(initiator: bool, now: float, *, last_success: float | None, erased: bool) -> Clock:
    """Clock at start-up: rotate at once; the reject_after bound counts from the last success."""
    return Clock(
        initiator=initiator,
        last_success=now if last_success is None else last_success,
        next_attempt=now,
        erased=erased,
    )


def after_success(clock: Clock, timing: Timing, now: float, rand: float) -> Clock:
    """Next rotation one interval later, shortened by up to `jitter` (rand in [0, 1)), then
    put off to the next multiple of `grid`."""
    due = now + timing.interval * (1.0 - timing.jitter * rand)
    if timing.grid > 0:
        due = max(due, math.ceil(due / timing.grid) * timing.grid)
    return replace(
        clock,
        last_success=now,
        next_attempt=due,
        failures=0,
        erased=False,
        starved_reported=False,
    )


def after_failure(clock: Clock, timing: Timing, now: float) -> Clock:
    """Exponential backoff, capped, and never past the next regular rotation time."""
    failures = clock.failures + 1
    # the exponent is capped: 2.0 ** 1024 would overflow after a long outage
    delay = min(
        timing.backoff_max, timing.backoff_min * 2.0 ** min(failures - 1, 60), timing.interval
    )
    return replace(clock, next_attempt=now + delay, failures=failures)


def after_erase(clock: Clock) -> Clock:
    return replace(clock, erased=True)


def after_erase_attempt(clock: Clock, timing: Timing, now: float, *, failed: bool) -> Clock:
    """An erase (first or retried) ended: when some sink still holds its key, try again with
    the link's backoff (doubling, capped at `backoff_max`) until it is gone."""
    if not failed:
        return replace(clock, erase_retry_at=None, erase_failures=0)
    failures = clock.erase_failures + 1
    delay = min(timing.backoff_max, timing.backoff_min * 2 ** min(failures - 1, 30))
    return replace(clock, erase_retry_at=now + delay, erase_failures=failures)


def after_starved(clock: Clock) -> Clock:
    return replace(clock, starved_reported=True)


K = TypeVar("K")


class DueQueue(Generic[K]):
    """The next due time of each of many keys, earliest first (a heap).

    Setting a key's time again supersedes its entry: the old one stays in the heap and is
    dropped when it surfaces, and the heap is rebuilt once such stale entries outnumber the
    live ones, so its size stays proportional to the number of keys.
    """

    __slots__ = ("_due", "_heap", "_order")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, tuple[float, int]] = {}
        self._order = itertools.count()
        """Ties break by insertion order; keys are never compared."""

    def __len__(self) -> int:
        return len(self._due)

    def when(self, key: K) -> float | None:
        entry = self._due.get(key)
        return None if entry is None else entry[0]

    def set(self, key: K, when: float) -> None:
        entry = (when, next(self._order))
        self._due[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(*e, k) for k, e in self._due.items()]
            heapq.heapify(self._heap)

    def discard(self, key: K) -> None:
        self._due.pop(key, None)

    def next_due(self) -> float:
        """The earliest due time (infinity when empty)."""
        heap = self._heap
        while heap:
            when, order, key = heap[0]
            if self._due.get(key) == (when, order):
                return when
            heapq.heappop(heap)
        return math.inf

    def pop_due(self, now: float) -> list[K]:
        """The keys due at `now`, earliest first; they leave the queue."""
        due = []
        while self.next_due() <= now and self._heap:
            key = heapq.heappop(self._heap)[2]
            del self._due[key]
            due.append(key)
        return due
