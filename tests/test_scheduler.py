"""Scheduling decisions as a pure function of (clock, timing, now)."""

from __future__ import annotations

import math

from qkdagent import scheduler as s

T = s.Timing(interval=120, jitter=0.1, reject_after=180, backoff_min=1, backoff_max=30)


def test_initiator_rotates_at_start_and_responder_waits() -> None:
    assert s.decide(s.start(True, 0, last_success=None, erased=True), T, 0) == s.Rotate()
    responder = s.start(False, 0, last_success=None, erased=True)
    assert s.decide(responder, T, 0) == s.Wait(180)  # to report a silent peer, once
    assert s.decide(responder, T, 180) == s.Starved()
    assert s.decide(s.after_starved(responder), T, 180) == s.Wait(math.inf)


def test_responder_reports_starvation_once_per_silence() -> None:
    clock = s.after_success(s.start(False, 0, last_success=None, erased=True), T, 5, rand=0)
    assert s.decide(clock, T, 185) == s.Erase("reject_after")  # erasing comes first
    erased = s.after_erase(clock)
    assert s.decide(erased, T, 185) == s.Starved()
    quiet = s.after_starved(erased)
    assert s.decide(quiet, T, 1e6) == s.Wait(math.inf)
    again = s.after_success(quiet, T, 300, rand=0)  # a rotation arrived: the next silence counts
    assert not again.starved_reported and s.decide(again, T, 480) == s.Erase("reject_after")
    assert s.decide(s.after_erase(again), T, 480) == s.Starved()


def test_after_success_waits_one_jittered_interval() -> None:
    clock = s.after_success(s.start(True, 0, last_success=None, erased=True), T, 10, rand=0.0)
    assert s.decide(clock, T, 10) == s.Wait(130)
    early = s.after_success(clock, T, 10, rand=0.999)
    assert 10 + 108 <= early.next_attempt < 10 + 108.1
    assert s.decide(early, T, early.next_attempt) == s.Rotate()


def test_reject_after_erases_once_then_waits() -> None:
    clock = s.after_success(s.start(True, 0, last_success=None, erased=False), T, 0, rand=0)
    clock = s.after_failure(clock, T, 150)
    assert s.decide(clock, T, 150.5) == s.Wait(151)
    assert s.decide(clock, T, 179.9) == s.Rotate()
    assert s.decide(clock, T, 180) == s.Erase("reject_after")
    erased = s.after_erase(clock)
    assert s.decide(erased, T, 180) == s.Rotate()  # keeps trying, no second erase
    assert s.decide(s.after_failure(erased, T, 180), T, 180.5) == s.Wait(182)  # second failure: 2 s


def test_responder_wakes_for_its_own_deadline() -> None:
    clock = s.after_success(s.start(False, 0, last_success=None, erased=True), T, 5, rand=0)
    assert s.decide(clock, T, 6) == s.Wait(185)
    assert s.decide(clock, T, 185) == s.Erase("reject_after")


def test_backoff_doubles_and_caps() -> None:
    clock = s.start(True, 0, last_success=None, erased=True)
    delays = []
    now = 0.0
    for _ in range(8):
        clock = s.after_failure(clock, T, now)
        delays.append(clock.next_attempt - now)
        now = clock.next_attempt
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert s.after_success(clock, T, now, 0).failures == 0


def test_backoff_never_exceeds_interval() -> None:
    short = s.Timing(interval=5, reject_after=20, backoff_min=4, backoff_max=60)
    clock = s.after_failure(
        s.after_failure(s.start(True, 0, last_success=None, erased=True), short, 0), short, 0
    )
    assert clock.next_attempt == 5


def test_restart_keeps_reject_deadline_from_last_success() -> None:
    clock = s.start(True, 1000, last_success=900, erased=False)
    assert s.decide(clock, T, 1000) == s.Rotate()
    assert s.decide(s.after_failure(clock, T, 1000), T, 1080) == s.Erase("reject_after")


def test_a_grid_puts_the_next_rotation_off_to_its_next_multiple() -> None:
    grid = s.Timing(interval=120, jitter=0.1, grid=0.5)
    plain = s.Timing(interval=120, jitter=0.1)
    clock = s.start(True, 0, last_success=None, erased=False)
    for now, rand in ((0.3, 0.0), (10.26, 0.5), (7.0, 0.999), (3.5, 0.0)):
        due = s.after_success(clock, grid, now, rand).next_attempt
        unaligned = s.after_success(clock, plain, now, rand).next_attempt
        assert unaligned <= due < unaligned + 0.5
        assert math.isclose(due * 2, round(due * 2))
    # links whose rotations fall within one step of the grid start together
    dues = {s.after_success(clock, grid, 10 + i / 100, 0.0).next_attempt for i in range(1, 40)}
    assert dues == {130.5}
