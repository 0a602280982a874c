"""InlineGate: short blocking calls run on the event loop, slow ones send the next to threads."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest
import trio

from qkdagent.inline import InlineGate
from tests.helpers import ScheduleCount


def where() -> int:
    return threading.get_ident()


async def test_fast_calls_run_on_the_event_loop() -> None:
    gate = InlineGate(limit=math.inf)
    for _ in range(3):
        assert await gate.run(where) == threading.get_ident()
    assert (gate.inline_calls, gate.threaded_calls) == (3, 0)


async def test_a_fast_call_on_the_loop_is_no_schedule_point_and_one_that_blocked_it_is() -> None:
    fast = InlineGate(limit=math.inf, yield_after=math.inf)  # no call counts as blocking
    with ScheduleCount() as count:
        await fast.run(where)
    assert count.points == 0
    blocking = InlineGate(limit=math.inf, yield_after=0.0)  # every call counts as blocking
    with ScheduleCount() as count:
        await blocking.run(where)
    assert count.points == 1
    with trio.CancelScope() as scope:  # a cancel point either way
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await fast.run(where)
    assert fast.inline_calls == 1


async def test_a_slow_call_sends_the_next_ones_to_a_thread_until_the_cooldown_ends() -> None:
    gate = InlineGate(limit=0.0, cooldown=3600, first_cooldown=3600)  # every call is slow
    assert await gate.run(where) == threading.get_ident()  # not known to be slow yet
    assert await gate.run(where) != threading.get_ident()
    assert await gate.run(where) != threading.get_ident()
    assert (gate.inline_calls, gate.threaded_calls) == (1, 2)
    gate = InlineGate(limit=0.0, cooldown=0.0)  # the cooldown is over at once
    await gate.run(where)
    assert await gate.run(where) == threading.get_ident()


class Clock:
    """The gate's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def threaded_for(gate: InlineGate, clock: Clock) -> float:
    """How long from now the gate keeps calls off the loop (its budget unused)."""
    return max(0.0, gate._threaded_until - clock.now)


def gate_on(clock: Clock, **kwargs: float) -> InlineGate:
    options = {"limit": 0.01, "stall": 0.1, "cooldown": 30, "first_cooldown": 1, "quiet": 60}
    return InlineGate(clock=clock, **{**options, **kwargs})


def test_a_one_off_slow_call_sends_its_kind_to_threads_for_the_first_cooldown_only() -> None:
    clock = Clock()
    gate = gate_on(clock)
    gate.measured(0.005)  # fast: nothing changes
    assert gate.inline()
    gate.measured(0.02)
    assert threaded_for(gate, clock) == 1
    clock.now += 0.999
    assert not gate.inline()
    clock.now += 0.001
    assert gate.inline()
    clock.now += 59.999  # a minute after the last slow call: the next is a one-off again
    gate.measured(0.02)
    assert threaded_for(gate, clock) == 1


def test_each_slow_call_within_the_quiet_spell_of_another_doubles_the_cooldown() -> None:
    clock = Clock()
    gate = gate_on(clock)
    lengths = []
    for _ in range(7):
        gate.measured(0.02)
        lengths.append(threaded_for(gate, clock))
        clock.now += 59  # the cooldown long over, but within the minute: a slow spell
    assert lengths == [1, 2, 4, 8, 16, 30, 30]  # up to the whole cooldown, and there it stays
    clock.now += 1.001  # a minute after the last slow call: the next is a one-off again
    gate.measured(0.02)
    assert threaded_for(gate, clock) == 1
    clock.now += 59
    gate.measured(0.02)
    assert threaded_for(gate, clock) == 2


def test_the_doubling_stops_at_the_whole_cooldown_and_is_kept_per_kind() -> None:
    clock = Clock()
    disk, cache = gate_on(clock, cooldown=20), gate_on(clock)
    cache.join(disk)
    lengths = []
    for _ in range(7):
        disk.measured(0.02)
        lengths.append(threaded_for(disk, clock))
        clock.now += 21
    assert lengths == [1, 2, 4, 8, 16, 20, 20]
    cache.measured(0.02)  # the disk's slow spell says nothing of the page cache
    assert threaded_for(cache, clock) == 1
    clock.now += 2
    cache.measured(0.02)
    assert threaded_for(cache, clock) == 2
    for _ in range(4):  # the disk slow again and again, the page cache quiet for a minute
        clock.now += 16
        disk.measured(0.02)
    cache.measured(0.02)  # a one-off for its kind
    assert threaded_for(cache, clock) == 1


def test_with_no_first_cooldown_the_second_slow_call_takes_the_whole_cooldown() -> None:
    clock = Clock()
    gate = gate_on(clock, first_cooldown=0)
    gate.measured(0.02)
    assert gate.inline()
    gate.measured(0.02)
    assert threaded_for(gate, clock) == 30


def test_each_slow_spell_after_a_quiet_minute_starts_again_from_the_first_cooldown() -> None:
    """Spells of slow calls 92 s apart (32 slow seconds, then a quiet minute): each blocks the
    loop six times, at the same offsets from its start."""
    blocked = blocked_by(0.1, lambda t: t % 92 < 32, 92 * 5)
    spells = [[round(t - 92 * n) for t in blocked if 92 * n <= t < 92 * (n + 1)] for n in range(5)]
    assert spells == [[0, 1, 3, 7, 15, 31]] * 5


def blocked_by(spacing: float, slow: Callable[[float], bool], seconds: float = 600) -> list[float]:
    """The times (since the first call) at which slow calls blocked the loop: a call every
    `spacing` seconds, slow where `slow(t)`, each made on the loop when the gate lets it."""
    clock = Clock()
    gate = gate_on(clock)
    blocked = []
    for step in range(int(seconds / spacing)):
        t = step * spacing
        clock.now = 1000 + t
        if gate.inline():
            if slow(t):
                blocked.append(t)
                gate.measured(0.05)
            else:
                gate.measured(0.001)
    return blocked


def test_slow_calls_block_the_loop_at_most_six_times_a_minute() -> None:
    """However the slow calls come: a disk slow on every call, at any spacing, or slow in
    bursts between fast spells."""
    patterns = [(spacing, lambda t: True) for spacing in (0.1, 0.9, 2.01, 29.9, 31, 59.9, 61)]
    patterns += [
        (0.1, lambda t: t % 62 < 10),  # ten slow seconds a minute
        (0.1, lambda t: t % 61.5 < 1.5),  # a slow spell just after each quiet minute
        (0.5, lambda t: t % 31 < 2),
    ]
    for spacing, slow in patterns:
        blocked = blocked_by(spacing, slow)
        most = max(sum(1 for t in blocked if start <= t < start + 60) for start in blocked)
        assert most <= 6, (spacing, most)
        later = [t for t in blocked if t >= 120]  # then at most once per cooldown, or per call
        assert len(later) <= max(2 * (600 - 120) / 60, (600 - 120) / spacing) + 1, spacing
    # the six: the one-off's second, then twice as long each time up to the whole cooldown
    assert [round(t) for t in blocked_by(0.1, lambda t: True, 100)] == [0, 1, 3, 7, 15, 31, 61, 91]


def test_a_stall_sends_every_kind_to_threads_for_the_whole_cooldown_and_counts_as_slow() -> None:
    clock = Clock()
    disk, cache = gate_on(clock), gate_on(clock, cooldown=40)
    cache.join(disk)
    disk.measured(0.2)
    assert threaded_for(disk, clock) == 30 and threaded_for(cache, clock) == 40
    disk.measured(0.05)  # a slow call's cooldown never shortens a stall's
    assert threaded_for(disk, clock) == 30
    clock.now += 45  # both cooldowns over: a slow call of either kind is no one-off
    cache.measured(0.05)
    assert threaded_for(cache, clock) == 40
    disk.measured(0.05)  # the stalled kind's too: the whole cooldown, not a doubled second
    assert threaded_for(disk, clock) == 30


async def test_a_threaded_call_that_is_fast_again_does_not_extend_the_cooldown() -> None:
    gate = InlineGate(limit=math.inf, cooldown=3600)
    gate.measured(1.0)  # over no limit: nothing changes
    assert gate.inline()
    gate = InlineGate(limit=0.5, cooldown=3600)
    gate.measured(0.6)
    assert not gate.inline()


async def test_a_call_on_a_thread_extends_the_cooldown_only_if_it_stalled() -> None:
    """On a thread a call also waits for the interpreter lock: under load its wall time says
    little about the disk, and holding it to `limit` kept a loaded agent on threads for good.
    A stall past `stall` still does."""
    import time

    gate = InlineGate(limit=0.001, cooldown=3600, stall=3600, first_cooldown=3600)
    await gate.run(lambda: time.sleep(0.002))  # on the loop, slow: the cooldown starts
    until = gate._threaded_until
    assert await gate.run(lambda: (time.sleep(0.01), where())[1]) != threading.get_ident()
    assert gate._threaded_until == until
    gate = InlineGate(limit=0.001, cooldown=3600, stall=0.005, first_cooldown=3600)
    await gate.run(lambda: time.sleep(0.002))
    until = gate._threaded_until
    await gate.run(lambda: time.sleep(0.01))
    assert gate._threaded_until > until


async def test_a_stall_on_a_thread_counts_if_the_call_fails_or_its_caller_is_cancelled() -> None:
    """A hang that ends in an I/O error is a stall too; and a call on a thread is never
    abandoned, so a cancelled caller still waits for it, and its stall is recorded."""
    import time

    def hang_then_fail() -> None:
        time.sleep(0.01)
        raise OSError(5, "Input/output error")

    gate = InlineGate(stall=0.001, budget=0)  # every call on a thread
    with pytest.raises(OSError, match="Input/output"):
        await gate.run(hang_then_fail)
    assert gate._threaded_until > time.monotonic() + gate.cooldown / 2
    gate = InlineGate(stall=0.001, budget=0)
    started = time.monotonic()
    with trio.move_on_after(0.001) as scope:  # the deadline passes while the call runs
        await gate.run(lambda: time.sleep(0.05))
    assert scope.cancel_called and time.monotonic() - started >= 0.05
    assert gate._threaded_until > time.monotonic() + gate.cooldown / 2


async def test_errors_reach_the_caller_from_either_path() -> None:
    def boom() -> None:
        raise OSError(5, "Input/output error")

    for gate in (InlineGate(limit=math.inf), InlineGate(limit=0.0, cooldown=3600)):
        with pytest.raises(OSError, match="Input/output"):
            await gate.run(boom)
        with pytest.raises(OSError, match="Input/output"):
            await gate.run(boom)


async def test_a_caller_cancelled_before_the_call_runs_nothing() -> None:
    gate = InlineGate(limit=math.inf)
    calls: list[int] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await gate.run(lambda: calls.append(1))
    assert scope.cancelled_caught and calls == []


async def test_calls_on_the_loop_stop_once_they_used_the_budget_of_the_second() -> None:
    gate = InlineGate(limit=math.inf, budget=1e-12)  # any blocking at all uses it up
    assert await gate.run(where) == threading.get_ident()  # the window's first call
    assert await gate.run(where) != threading.get_ident()
    assert (gate.inline_calls, gate.threaded_calls) == (1, 1)
    gate = InlineGate(limit=math.inf, budget=math.inf)
    for _ in range(5):
        assert await gate.run(where) == threading.get_ident()


def test_one_gate_per_event_loop_and_kind_shared_by_their_users() -> None:
    from qkdagent.inline import CACHE, DISK, loop_gate

    async def lookups() -> tuple[InlineGate, ...]:
        return loop_gate(DISK), loop_gate(DISK), loop_gate(CACHE), loop_gate(CACHE)

    first = trio.run(lookups)
    second = trio.run(lookups)
    assert first[0] is first[1] and first[2] is first[3]  # the stores see one gate, ...
    assert first[0] is not first[2]  # ... the page-cache writes (the file sinks) another ...
    assert second[0] is not first[0] and second[2] is not first[2]  # ... of their own loop


async def test_a_slow_fsync_leaves_page_cache_writes_on_the_loop() -> None:
    """A commit held up by writeback says nothing about a small write the page cache takes:
    each kind of call is judged by its own, and has its own budget."""
    from qkdagent.inline import CACHE, DISK, loop_gate

    disk, cache = loop_gate(DISK), loop_gate(CACHE)
    disk.measured(disk.limit * 2)  # an fsync over the limit: fsyncs go to threads ...
    assert await disk.run(where) != threading.get_ident()
    assert await cache.run(where) == threading.get_ident()  # ... page-cache writes do not
    disk._spent = disk.budget  # the fsyncs used up their second's budget: not the writes'
    assert await cache.run(where) == threading.get_ident()
    cache.measured(cache.limit * 2)  # a slow page-cache write (writeback throttling it)
    assert await cache.run(where) != threading.get_ident()


async def test_an_unknown_kind_of_call_has_no_gate() -> None:
    from qkdagent.inline import loop_gate

    with pytest.raises(ValueError, match="no gate kind 'fast'"):
        loop_gate("fast")


async def test_a_stall_sends_every_kind_of_call_to_threads() -> None:
    """A call past `stall` is a disk in real trouble, not an fsync behind a checkpoint: every
    kind's calls go to threads, whether it stalled on the loop or on a thread."""
    import time

    from qkdagent.inline import CACHE, DISK, loop_gate

    disk, cache = loop_gate(DISK), loop_gate(CACHE)
    disk.measured((disk.limit + disk.stall) / 2)  # slow, no stall: fsyncs only
    assert not disk.inline() and cache.inline()
    disk.measured(disk.stall * 2)  # a stall on the loop
    assert not cache.inline()

    disk, cache = InlineGate(stall=0.001), InlineGate(stall=0.001, budget=0)  # cache: threads
    cache.join(disk)
    assert await cache.run(lambda: (time.sleep(0.01), where())[1]) != threading.get_ident()
    assert not disk.inline() and not cache.inline()  # a stall on a thread
    lone, other = InlineGate(stall=0.001, budget=0), InlineGate()  # not joined: no shared stall
    await lone.run(lambda: time.sleep(0.01))
    assert lone._threaded_until > time.monotonic() and other.inline()
