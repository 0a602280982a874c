"""When a short blocking call (an SQLite commit, a small file rename) may run on the event loop.

A hop to a worker thread and back costs 0.3-0.5 ms of wall time and 0.2-0.35 ms of CPU on this
VM (two wake-ups; 0.13-0.2 ms with both threads on one CPU:
`contrib/bench/bench_thread_hop.py`), more than the call itself on a fast disk: on the rotation
path that was a third of the latency. Blocking the loop is only acceptable while it stays rare
and short, so the gate watches the calls:

- a call over `stall` (a disk in real trouble), on the loop or on a thread, sends the following
  calls of every kind to worker threads for `cooldown` seconds, after which the loop is tried
  again: a disk that stalls keeps them on threads, blocking the loop once per cooldown at most;
- a call over `limit` on the loop (a slow fsync, say one queued behind the agent's own
  checkpoint) sends the following calls of its kind to threads for `first_cooldown` if no call
  of its kind was slow on the loop, and no call of any kind stalled, in the last `quiet`
  seconds; else for twice the length of its kind's last cooldown, up to `cooldown` (after a
  stall, `cooldown` at once). A slow spell costs seconds of thread hops, not half a minute of
  them: at 10,000 links a second slow commit within the minute (10-63 ms, as the round's burst
  of commits met a checkpoint on the same disk) sent the next 30 s of calls, 7,000-18,000 of
  them, to threads, for 0.1-0.3 ms more CPU per rotation (of 1.0-1.5 ms). What that costs: at
  the defaults, slow calls block the loop at most six times in any 60 s per kind (at 0, 1, 3, 7,
  15 and 31 s; twelve for the two kinds), against three with the whole cooldown from the second;
  a spell that comes back after a quiet minute starts again from `first_cooldown`, so spells a
  minute and a half apart block it six times each (about 240 times an hour per kind, against
  120), while a disk that stays slow blocks it once per `cooldown`, as before. Each such call is
  under `stall`, and the budget (below) still bounds the time blocked. A disk that is slow a few
  times and then stalls holds the loop in that stall 1, 3, 7 or 15 s after its first slow
  call, where the whole cooldown from the second held it off until 31 s; from then on, once
  per `cooldown`. A slow call on a thread changes nothing (below);
- the calls run on the loop may block it for at most `budget` of every second; past that, the
  rest of the second's calls go to threads (where concurrent commits share a transaction).

The gate learns that a call was slow only once it returns: a call that stalls (an fsync behind
heavy writeback) blocks the loop, every link's timers and the peer API with it, for as long as
it stalls, once per cooldown. Background work that is not on a rotation's path (checkpoints,
deferred fsyncs) does not use a gate: it always runs on a thread, where a stall delays nothing
else.

Each event loop has one gate per kind of call (`loop_gate(kind)`), shared by everything on the
loop: `DISK` for calls that wait for the disk (an fsync: the state store's commits, a durable
file), `CACHE` for calls that only reach the page cache (a small file written without an fsync,
a rename, a read). A slow fsync says nothing about a write the page cache absorbs: with one gate
for both, each fsync held up by the agent's own checkpoint sent every sink install to threads
for the cooldown, and the store's commits used up the budget of installs that take a tenth of
their time (at 10,000 links, two thirds of the installs ran on threads, each hop costing more
CPU than the write). Each kind learns from its own slow calls and has its own budget, so the
loop may be blocked for twice `budget` per second in all. A stall past `stall` (a disk in real
trouble, not an fsync queued behind a checkpoint) sends every kind to threads, as one gate did:
a disk that stalls an fsync soon stalls renames too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")

LIMIT = 0.01
"""Seconds a call may take and still be run on the event loop next time."""
COOLDOWN = 30.0
"""Seconds calls stay on worker threads after a stall (a call over STALL), and the longest they
stay after a slow call (over LIMIT)."""
FIRST_COOLDOWN = 1.0
"""Seconds calls of a kind stay on worker threads after a slow call (over LIMIT, not a stall)
that is the first slow call or stall in QUIET seconds; each slow call within QUIET of the last
doubles the previous length, up to COOLDOWN."""
QUIET = 60.0
"""Seconds without a slow call or stall after which a slow call counts as a one-off."""
BUDGET = 0.1
"""Seconds per second the loop may spend blocked in calls run on it."""
YIELD_AFTER = 0.001
"""Seconds a call on the loop may take before its caller lets the other tasks run (a pass of
the loop) before it goes on: a call that blocked the loop does; a rename of tens of
microseconds does not pay a pass for it (one or two of each agent's wake-ups per rotation at
10,000 links)."""
STALL = 0.1
"""Seconds a call on a worker thread may take before it, too, extends the cooldown: well above
what waiting for the interpreter lock adds under load, so only a disk in real trouble. A call
past it, on the loop or a thread, starts the cooldown of every kind of call on its loop."""


DISK = "disk"
"""Calls that wait for the disk: an fsync (a durable commit, a durable file)."""
CACHE = "cache"
"""Calls that only reach the page cache: a small write without an fsync, a rename, a read."""
KINDS = (DISK, CACHE)

_LOOP_GATES: trio.lowlevel.RunVar[dict[str, InlineGate]] = trio.lowlevel.RunVar(
    "qkdagent_inline_gates"
)


def loop_gate(kind: str) -> InlineGate:
    """The running event loop's gate for calls of `kind` (`DISK` or `CACHE`): one per kind
    and `trio.run`, shared by its agents."""
    if kind not in KINDS:
        raise ValueError(f"no gate kind {kind!r}")
    try:
        gates = _LOOP_GATES.get()
    except LookupError:
        gates = {}
        _LOOP_GATES.set(gates)
    gate = gates.get(kind)
    if gate is None:
        gate = gates[kind] = InlineGate()
        gate.join(next(iter(gates.values())))
    return gate


def loop_gate_counts() -> dict[str, tuple[int, int, int]]:
    """Per kind of call, for the running loop's gates: calls run on the loop, calls sent to
    threads (after a slow call or a stall, or past the second's budget), and cooldowns that
    sent the kind to threads from the loop (`/metrics`); zeros for a kind whose gate no call
    has looked up yet, nothing outside a trio run."""
    try:
        gates = _LOOP_GATES.get()
    except LookupError:
        gates = {}
    except RuntimeError:  # no trio run here
        return {}
    counts = {kind: (0, 0, 0) for kind in KINDS}
    for kind, g in gates.items():
        counts[kind] = (g.inline_calls, g.threaded_calls, g.cooldowns)
    return counts


class InlineGate:
    def __init__(
        self,
        limit: float = LIMIT,
        cooldown: float = COOLDOWN,
        budget: float = BUDGET,
        stall: float = STALL,
        yield_after: float = YIELD_AFTER,
        first_cooldown: float = FIRST_COOLDOWN,
        quiet: float = QUIET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.yield_after = yield_after
        self._last = 0.0
        """How long the last call run here took."""
        self.stall = stall
        self.cooldown = cooldown
        self.first_cooldown = first_cooldown
        self.quiet = quiet
        self.budget = budget
        self._clock = clock
        self._slow_at = -math.inf
        """When the last slow call or stall was recorded."""
        self._next_cooldown = first_cooldown
        """How long a slow call within `quiet` of the last slow call or stall sends this kind
        to threads: twice the last slow call's, or `cooldown` after a stall."""
        self._threaded_until = -1.0
        self._second = -1.0
        """Start of the current one-second window of the budget."""
        self._spent = 0.0
        """Seconds the loop was blocked in this window."""
        self.inline_calls = 0
        self.threaded_calls = 0
        self.cooldowns = 0
        """Cooldowns that sent this kind from the loop to threads (not those that only kept it
        there longer: stalled calls already on threads, under load, would count by the
        thousand)."""
        self._family: list[InlineGate] = [self]
        """The loop's gates (one per kind), which a stall past `stall` sends to threads."""

    def inline(self) -> bool:
        """Whether the next call may block the loop."""
        now = self._clock()
        if now - self._second >= 1.0:
            self._second, self._spent = now, 0.0
        return now >= self._threaded_until and self._spent < self.budget

    def join(self, other: InlineGate) -> None:
        """Share stalls with `other`'s gates (those of the other kinds of call on a loop)."""
        if other is not self:
            other._family.append(self)
            self._family = other._family

    def measured(self, seconds: float) -> None:
        """Record how long a call on the loop took."""
        if seconds <= self.limit:
            return
        if seconds > self.stall:
            self._cool_down(self._family)
        else:
            self._slow()

    def _slow(self) -> None:
        """A slow call on the loop: this kind to threads, briefly if it is a one-off, for
        longer the more slow calls follow each other (a slow spell costs seconds of hops,
        a disk that stays slow gets the whole cooldown)."""
        now = self._clock()
        one_off = now - self._slow_at > self.quiet
        length = min(self.first_cooldown if one_off else self._next_cooldown, self.cooldown)
        # doubled up to the whole cooldown (which a one-off of no length goes to at once)
        self._next_cooldown = min(2 * length, self.cooldown) if length > 0 else self.cooldown
        self._backed_off(now, length)

    def _cool_down(self, gates: list[InlineGate]) -> None:
        """A stall: `gates` to threads for the whole `cooldown` (and a slow call within
        `quiet` of it is no one-off: it takes the whole cooldown too)."""
        now = self._clock()
        for gate in gates:
            gate._next_cooldown = gate.cooldown
            gate._backed_off(now, gate.cooldown)

    def _backed_off(self, now: float, length: float) -> None:
        if now >= self._threaded_until:
            self.cooldowns += 1
        self._slow_at = now
        self._threaded_until = max(self._threaded_until, now + length)

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the loop while calls are short and rare, else on a worker thread (never
        abandoned: a cancelled caller still waits for a started call to finish)."""
        if self.inline():
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                return self.run_here(fn)
            finally:
                if self._last >= self.yield_after:
                    await trio.lowlevel.cancel_shielded_checkpoint()
        self.threaded_calls += 1
        took = [0.0]
        try:
            return await trio.to_thread.run_sync(self._timed, fn, took)
        finally:
            # recorded here, on the loop: the gates' state has one writer, no thread races it
            if took[0] > self.stall:
                self._cool_down(self._family)

    def run_here(self, fn: Callable[[], T]) -> T:
        """`fn()` on the loop, measured: for a caller that asked `inline()` just before."""
        self.inline_calls += 1
        started = time.perf_counter()
        try:
            return fn()
        finally:
            took = self._last = time.perf_counter() - started
            self._spent += took
            self.measured(took)

    @staticmethod
    def _timed(fn: Callable[[], T], took: list[float]) -> T:
        """`fn()` on a worker thread, its wall time into `took[0]`. There a call also waits
        for the interpreter lock, held by the loop and other threads: under load its wall time
        says little about the disk, and holding it to `limit` kept a busy agent on threads for
        good (each thread's wait made the next one longer). Only a stall past `stall` extends
        the cooldown from there."""
        started = time.perf_counter()
        try:
            return fn()
        finally:
            took[0] = time.perf_counter() - started
