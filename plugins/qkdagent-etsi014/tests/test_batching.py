"""Calls for several keys at once (`batching`): links to the same peer SAE that ask together
share one Get key request, `enc_keys` with `number` > 1 and `dec_keys` naming several key IDs,
against the simulated KMEs over mutual TLS; and the cases where a shared call must go back to
one key per call."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from qkdagent_etsi014.app import Quirks
from qkdagent_etsi014.batching import (
    SPLITS_BEFORE_PAUSE,
    Shared,
    after_no_keys,
    counts_toward_pause,
    keys_per_call,
    pauses_at_once,
)
from qkdagent_etsi014.network import Limits
from qkdagent_etsi014.retry import Outcome
from qkdagent_etsi014.sim import SimSettings, Simulator, open_simulator
from qkdagent_etsi014.source import Etsi014Source
from qkdagent_etsi014.turns import Turns

from qkdagent import ConfigError, Key, KeyNotFound, Link, SourceUnavailable

from .conftest import KMES, make_source

FAST = {"retry_backoff": 0.01, "max_backoff": 0.05}

T = TypeVar("T")


def _links(count: int, initiator: bool = True) -> tuple[Link, ...]:
    if initiator:
        return tuple(Link(f"l{i}", "alice", "bob", True) for i in range(count))
    return tuple(Link(f"l{i}", "bob", "alice", False) for i in range(count))


async def _together(calls: list[Callable[[], Awaitable[T]]]) -> list[T | BaseException]:
    """Start every call in the same scheduler batch (as links woken by the same grid point)."""
    results: list[T | BaseException] = [RuntimeError("not run")] * len(calls)

    async def one(index: int) -> None:
        try:
            results[index] = await calls[index]()
        except Exception as exc:
            results[index] = exc

    async with trio.open_nursery() as nursery:
        for index in range(len(calls)):
            nursery.start_soon(one, index)
    return results


def _requests(sim: Simulator, kme: str) -> int:
    """Requests `kme` received, whatever the answer."""
    return sim.apps[kme].received


async def _pair(
    sim: Simulator, sources: Any, count: int, **options: Any
) -> tuple[Etsi014Source, Etsi014Source]:
    alice = await sources("alice", links=_links(count), **options)
    bob = await sources("bob", links=_links(count, initiator=False), **options)
    return alice, bob


def _keys(results: list[Any]) -> list[Key]:
    assert all(isinstance(r, Key) for r in results), results
    return results


async def _all_new(source: Etsi014Source) -> list[Key]:
    """A key for each of the source's links, all asked for together."""
    return _keys(await _together([lambda link=link: source.new_key(link) for link in source.links]))


async def _all_by_id(source: Etsi014Source, sent: list[Key]) -> list[Key]:
    """The keys named by `sent`, one per link of the source, all asked for together."""
    calls = [
        lambda link=link, key=key: source.key_by_id(link, key.key_id)
        for link, key in zip(source.links, sent, strict=True)
    ]
    return _keys(await _together(calls))


# -- the pure decisions --------------------------------------------------------------------


def test_keys_per_call_takes_the_smallest_bound() -> None:
    assert keys_per_call(64, 1024, key_size=256, response_limit=1 << 20) == 64
    assert keys_per_call(64, 5, key_size=256, response_limit=1 << 20) == 5
    # 65536-bit keys are 10,924 characters of base64 each: 1 MiB holds 94 of them
    assert keys_per_call(256, 1024, key_size=65536, response_limit=1 << 20) == 94
    assert keys_per_call(64, 1024, key_size=65536, response_limit=1000) == 1


@pytest.mark.parametrize(
    "kme_max, one_id_only, paused", [(None, False, False), (64, True, False), (64, False, True)]
)
def test_one_key_per_call_when_unknown_by_get_or_paused(
    kme_max: int | None, one_id_only: bool, paused: bool
) -> None:
    assert (
        keys_per_call(
            64,
            kme_max,
            key_size=256,
            response_limit=1 << 20,
            one_id_only=one_id_only,
            paused=paused,
        )
        == 1
    )


def test_a_call_for_one_key_is_handled_as_before() -> None:
    for outcome in Outcome:
        for status in (None, 400, 503):
            for again in (False, True):
                shared = after_no_keys("dec_keys", 1, outcome, status=status, asked_again=again)
                assert shared is Shared.AS_ONE


def test_a_refused_connect_is_retried_as_it_is() -> None:
    for again in (False, True):
        assert (
            after_no_keys("enc_keys", 5, Outcome.UNAVAILABLE, status=None, asked_again=again)
            is Shared.AS_ONE
        )


@pytest.mark.parametrize(
    "operation, outcome",
    [
        ("enc_keys", Outcome.UNAVAILABLE),  # a 503: short of key, or busy
        ("dec_keys", Outcome.UNAVAILABLE),
        ("dec_keys", Outcome.NOT_FOUND),  # the KME may be catching up with its peer
        ("dec_keys", Outcome.NO_ROUTE),
    ],
)
def test_asked_again_whole_once_then_split(operation: str, outcome: Outcome) -> None:
    status = 503 if outcome is Outcome.UNAVAILABLE else 404
    first = after_no_keys(operation, 5, outcome, status=status, asked_again=False)
    assert first is Shared.AGAIN
    assert after_no_keys(operation, 5, outcome, status=status, asked_again=True) is Shared.SPLIT


def test_both_methods_carry_number_so_enc_keys_switches_as_before() -> None:
    for outcome in (Outcome.METHOD, Outcome.NO_ROUTE):
        assert after_no_keys("enc_keys", 5, outcome, status=405, asked_again=False) is (
            Shared.AS_ONE
        )
    assert after_no_keys("dec_keys", 5, Outcome.METHOD, status=405, asked_again=False) is (
        Shared.SPLIT  # several IDs go by POST only
    )


def test_a_refusal_splits_at_once() -> None:
    for operation in ("enc_keys", "dec_keys"):
        for outcome in (Outcome.REJECTED, Outcome.UNAUTHORIZED):
            assert (
                after_no_keys(operation, 5, outcome, status=400, asked_again=False) is Shared.SPLIT
            )


def test_a_shortage_does_not_count_toward_a_pause() -> None:
    assert not counts_toward_pause(Outcome.UNAVAILABLE)
    assert counts_toward_pause(Outcome.NOT_FOUND) and counts_toward_pause(Outcome.REJECTED)


def test_only_a_refusal_of_our_own_get_key_pauses_at_once() -> None:
    assert pauses_at_once("enc_keys", Outcome.REJECTED)
    assert pauses_at_once("enc_keys", Outcome.UNAUTHORIZED)
    assert not pauses_at_once("dec_keys", Outcome.REJECTED)  # the IDs are the peer's
    assert not pauses_at_once("enc_keys", Outcome.UNAVAILABLE)
    assert not pauses_at_once("enc_keys", Outcome.METHOD)


async def test_turns_wait_for_a_call_to_end_or_stall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two turns held: a third waits until the older of them has been under way for `stall`,
    and a fourth until the second has."""
    turns = Turns(at_once=2, stall=0.2)
    took: list[float] = []
    release = trio.Event()

    async def hold() -> None:
        async with turns.turn():
            took.append(trio.current_time())
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)  # at 0
        await trio.sleep(0.05)
        nursery.start_soon(hold)  # at 0.05
        await trio.sleep(0.01)
        nursery.start_soon(hold)  # at 0.06: waits, two fresh calls under way
        await trio.sleep(0.1)
        assert took == [0.0, 0.05]
        await trio.sleep(0.05)
        assert took == [0.0, 0.05, pytest.approx(0.2)]  # the first under way for 0.2 s
        nursery.start_soon(hold)  # waits: the second is fresh until 0.25, the third until 0.4
        await trio.sleep(1)
        assert took[3] == pytest.approx(0.25)
        release.set()
    assert not turns.fresh(trio.current_time()) and not turns._started


async def test_a_turn_ending_lets_the_next_go_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = Turns(at_once=1, stall=10.0)
    took: list[float] = []

    async def hold(seconds: float) -> None:
        async with turns.turn():
            took.append(trio.current_time())
            await trio.sleep(seconds)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, 1.0)
        await trio.sleep(0.01)
        nursery.start_soon(hold, 0.0)
    assert took == [0.0, 1.0]


# -- against the simulated KMEs --------------------------------------------------------------


async def test_links_asking_together_share_one_call_each_way(sim: Simulator, sources: Any) -> None:
    alice, bob = await _pair(sim, sources, 16)
    before_a, before_b = _requests(sim, "KME_A"), _requests(sim, "KME_B")
    sent = await _all_new(alice)
    assert _requests(sim, "KME_A") - before_a == 1
    assert len({key.key_id for key in sent}) == 16  # every caller its own key
    got = await _all_by_id(bob, sent)
    assert _requests(sim, "KME_B") - before_b == 1
    for mine, theirs in zip(sent, got, strict=True):  # each caller the key it named
        assert theirs.key_id == mine.key_id
        assert theirs.value.reveal() == mine.value.reveal()
    assert sim.apps["KME_A"].stats["keys"] == sim.apps["KME_B"].stats["keys"] == 16


async def test_a_call_carries_at_most_max_keys_per_call(sim: Simulator, sources: Any) -> None:
    alice, bob = await _pair(sim, sources, 10, max_keys_per_call=4)
    before_a, before_b = _requests(sim, "KME_A"), _requests(sim, "KME_B")
    sent = await _all_new(alice)
    assert _requests(sim, "KME_A") - before_a == 3  # 4 + 4 + 2
    got = await _all_by_id(bob, sent)
    assert _requests(sim, "KME_B") - before_b == 3
    assert [k.key_id for k in got] == [k.key_id for k in sent]


async def test_a_call_carries_at_most_the_kmes_max_key_per_request(
    pki: Path, tmp_path: Path
) -> None:
    settings = SimSettings(kmes=KMES, rate_bps=0.0, limits=Limits(max_key_per_request=3))
    async with open_simulator(pki, settings) as sim:
        alice = make_source(sim, "alice", tmp_path, links=_links(7))
        await alice.prepare()
        try:
            assert alice.limits["bob"].max_key_per_request == 3
            before = _requests(sim, "KME_A")
            await _all_new(alice)
            assert _requests(sim, "KME_A") - before == 3  # 3 + 3 + 1, none refused
            assert sim.apps["KME_A"].stats["400"] == 0
        finally:
            await alice.aclose()


async def test_an_unknown_key_id_fails_only_its_own_caller(sim: Simulator, sources: Any) -> None:
    alice, bob = await _pair(sim, sources, 3, not_found_retries=0)
    sent = await _all_new(alice)
    names = [sent[0].key_id, "00000000-0000-4000-8000-000000000000", sent[2].key_id]
    before = sim.apps["KME_B"].stats.copy()
    results = await _together(
        [
            lambda link=link, n=name: bob.key_by_id(link, n)
            for link, name in zip(bob.links, names, strict=True)
        ]
    )
    assert isinstance(results[1], KeyNotFound)
    assert [r.key_id for r in (results[0], results[2]) if isinstance(r, Key)] == [
        sent[0].key_id,
        sent[2].key_id,
    ]
    after = sim.apps["KME_B"].stats
    # the shared call refused as a whole (nothing delivered), then one call per key ID
    assert after["400"] - before["400"] == 2
    assert after["200"] - before["200"] == 2
    assert not bob._sharing_paused  # a key's absence is no refusal of shared calls


async def test_a_kme_refusing_several_keys_is_asked_one_at_a_time(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its Get status promised more than it serves (it takes one key per request): the shared
    call's callers each get a key by a call of their own, the refusal is logged once, and the
    next burst does not try."""
    settings = SimSettings(kmes=KMES, rate_bps=0.0, limits=Limits(max_key_per_request=1))
    async with open_simulator(pki, settings) as sim:
        alice = make_source(sim, "alice", tmp_path, links=_links(5))
        await alice.prepare()
        try:
            alice.limits["bob"] = dataclasses.replace(alice.limits["bob"], max_key_per_request=64)
            caplog.set_level(logging.WARNING, "qkdagent_etsi014")
            before = sim.apps["KME_A"].stats.copy()
            calls = [lambda link=link: alice.new_key(link) for link in alice.links]
            first = _keys(await _together(calls))
            again = _keys(await _together(calls))
            after = sim.apps["KME_A"].stats
        finally:
            await alice.aclose()
    assert after["400"] - before["400"] == 1  # the one shared call
    assert after["200"] - before["200"] == 10  # then one call per key, both bursts
    assert len({k.key_id for k in first + again}) == 10
    warnings = [r.getMessage() for r in caplog.records if "one key per call" in r.getMessage()]
    assert len(warnings) == 1 and "400 (rejected) to a call for 5 keys" in warnings[0]


class Hold:
    """Holds every answer of a KME until `release` is set (`KmeApp.before_answer`)."""

    def __init__(self, sim: Simulator, kme: str) -> None:
        self.release = trio.Event()
        sim.apps[kme].before_answer = self.release.wait


async def until(condition: Callable[[], bool]) -> None:
    """Poll the simulator and the source's fetches (they run in this process, over loopback)."""
    with trio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - state of other tasks, no event to wait on
            await trio.sleep(0.005)


def _running(source: Etsi014Source) -> list[Any]:
    return [fetch for fetches in source._fetches._running.values() for fetch in fetches]


async def test_a_key_for_a_caller_that_left_serves_the_next(sim: Simulator, sources: Any) -> None:
    """One of three callers sharing a call is cancelled once the KME has the request: the
    others get their keys, the leaver's key is held as a spare, and the next call takes it
    without asking the KME."""
    alice, _ = await _pair(sim, sources, 3)
    app = sim.apps["KME_A"]
    before = app.received
    hold = Hold(sim, "KME_A")
    got: list[Key] = []
    leaving = trio.CancelScope()

    async def call(link: Link) -> None:
        with leaving if link is alice.links[0] else trio.CancelScope():
            got.append(await alice.new_key(link))

    async with trio.open_nursery() as nursery:
        for link in alice.links:
            nursery.start_soon(call, link)
        await until(lambda: app.received > before)
        fetch = _running(alice)[0]
        assert fetch.limit == 3 and fetch.waiters == 3
        leaving.cancel()
        await until(lambda: fetch.waiters == 2)
        hold.release.set()
    assert leaving.cancelled_caught
    assert len(got) == 2 and app.received - before == 1 and app.stats["keys"] == 3
    assert len(alice._spare["bob"]) == 1
    spare = alice._spare["bob"][0]
    assert (await alice.new_key(alice.links[0])) is spare
    assert app.received - before == 1


async def test_dec_keys_by_get_names_one_key_id_per_call(sim: Simulator, sources: Any) -> None:
    alice, bob = await _pair(sim, sources, 4)
    sent = await _all_new(alice)
    bob.dec_method = "get"
    before = _requests(sim, "KME_B")
    await _all_by_id(bob, sent)
    assert _requests(sim, "KME_B") - before == 4


async def test_one_key_per_call_on_request(sim: Simulator, sources: Any) -> None:
    alice, _ = await _pair(sim, sources, 4, max_keys_per_call=1)
    before = _requests(sim, "KME_A")
    await _all_new(alice)
    assert _requests(sim, "KME_A") - before == 4


@pytest.mark.parametrize("value", [0, 257, "8", 1.5])
async def test_max_keys_per_call_is_checked(sim: Simulator, tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="max_keys_per_call"):
        make_source(sim, "alice", tmp_path, max_keys_per_call=value)


class _SimClock:
    """The simulator's clock, moved by hand: keys reach the slave's KME `sync_delay` after the
    master's Get key, by this clock."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


SIM_CLOCK = _SimClock()


async def test_links_asking_while_shared_calls_are_under_way_share_the_next(
    sim: Simulator, sources: Any
) -> None:
    """Two shared calls are under way (`turns`; here they never count as stalled): the links
    that ask meanwhile wait for a turn in one more call, all of them together, rather than
    each sending its own."""
    alice, _ = await _pair(sim, sources, 7)
    alice._turns["enc_keys", "bob"] = Turns(stall=60.0)
    app = sim.apps["KME_A"]
    before = app.received
    hold = Hold(sim, "KME_A")
    got: list[Key] = []

    async def call(link: Link) -> None:
        got.append(await alice.new_key(link))

    async with trio.open_nursery() as nursery:
        for index, link in enumerate(alice.links[:2]):  # two calls on the wire, in turn
            nursery.start_soon(call, link)
            await until(lambda index=index: app.received == before + index + 1)
        for link in alice.links[2:]:
            nursery.start_soon(call, link)
        await until(lambda: any(f.waiters == 5 for f in _running(alice)))
        assert len(_running(alice)) == 3 and app.received - before == 2  # the third waits
        hold.release.set()
    assert app.received - before == 3  # 1 + 1 + 5
    assert len({key.key_id for key in got}) == 7 and app.stats["keys"] == 7


async def test_a_key_id_whose_callers_left_before_the_call_is_not_asked_for(
    sim: Simulator, sources: Any
) -> None:
    """Its key stays on the KME (which would delete it), and a repeated call gets it."""
    alice, bob = await _pair(sim, sources, 4)
    sent = await _all_new(alice)
    bob._turns["dec_keys", "alice"] = Turns(stall=60.0)
    app = sim.apps["KME_B"]
    before = app.received
    hold = Hold(sim, "KME_B")
    got: list[Key] = []
    leaving = trio.CancelScope()

    async def call(index: int, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            got.append(await bob.key_by_id(bob.links[index], sent[index].key_id))

    async with trio.open_nursery() as nursery:
        for index in range(2):  # two calls on the wire, in turn
            nursery.start_soon(call, index)
            await until(lambda index=index: app.received == before + index + 1)
        nursery.start_soon(call, 2, leaving)
        nursery.start_soon(call, 3)
        await until(lambda: any(len(f.claims) == 2 for f in _running(bob)))
        third = next(f for f in _running(bob) if len(f.claims) == 2)
        leaving.cancel()
        await until(lambda: third.claims[sent[2].key_id] == 0)
        hold.release.set()
    assert leaving.cancelled_caught
    assert sorted(k.key_id for k in got) == sorted(sent[i].key_id for i in (0, 1, 3))
    assert app.received - before == 3 and app.stats["keys"] == 3
    assert sim.network.parked_count("KME_B") == 1  # the left caller's key, still on the KME
    repeated = await bob.key_by_id(bob.links[2], sent[2].key_id)
    assert repeated.value.reveal() == sent[2].value.reveal()


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_kme_short_of_key_serves_those_it_can(
    sim: Simulator, sources: Any, retries: int
) -> None:
    """It answers 503 to a call for more keys than it holds: the call is made again whole once
    (while `retries` allow), then the callers each call for their own, and as many get one as
    it holds. A shortage counts toward no pause."""
    alice, _ = await _pair(sim, sources, 5, retries=retries, **FAST)
    sim.network.link("KME_A", "KME_B").drain(keep_bits=3 * 256)
    before = sim.apps["KME_A"].stats.copy()
    results = await _together([lambda link=link: alice.new_key(link) for link in alice.links])
    after = sim.apps["KME_A"].stats
    assert sum(isinstance(r, Key) for r in results) == 3
    assert sum(isinstance(r, SourceUnavailable) for r in results) == 2
    # the shared call (twice with a retry), then the two left over (each twice with a retry)
    assert after["503"] - before["503"] == (1 + 2) * (1 + retries)
    assert after["200"] - before["200"] == 3
    assert not alice._splits and not alice._sharing_paused


@pytest.mark.parametrize(
    "settings", [SimSettings(kmes=KMES, rate_bps=0.0, quirks=Quirks(one_key_per_answer=True))]
)
async def test_a_kme_giving_fewer_keys_than_asked_for_is_asked_one_at_a_time(
    sim: Simulator, sources: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """It ignores `number` and all but the first key ID: the key it gave serves a caller, the
    others call on their own, and shared calls pause (one warning per kind of call)."""
    caplog.set_level(logging.WARNING, "qkdagent_etsi014")
    alice, bob = await _pair(sim, sources, 4)
    before_a, before_b = _requests(sim, "KME_A"), _requests(sim, "KME_B")
    sent = await _all_new(alice)
    assert _requests(sim, "KME_A") - before_a == 4  # the shared call (one key), then three
    got = await _all_by_id(bob, sent)
    assert _requests(sim, "KME_B") - before_b == 4
    assert [k.key_id for k in got] == [k.key_id for k in sent]
    assert all(a.value.reveal() == b.value.reveal() for a, b in zip(sent, got, strict=True))
    warnings = [r.getMessage() for r in caplog.records if "one key per call" in r.getMessage()]
    assert len(warnings) == 2 and all("answered 1 keys to a call for 4" in w for w in warnings)


@pytest.mark.parametrize(
    "settings", [SimSettings(kmes=KMES, rate_bps=0.0, sync_delay=30.0, clock=SIM_CLOCK)]
)
async def test_not_found_on_a_shared_call_is_asked_again_once(sim: Simulator, sources: Any) -> None:
    """The KME may not hold the keys yet (its peer's just asked for them): the shared call is
    made again after the backoff, and serves all once they are there."""
    SIM_CLOCK.now = 0.0
    alice, bob = await _pair(sim, sources, 3, not_found_retries=2, **FAST)
    sent = await _all_new(alice)
    app = sim.apps["KME_B"]
    before = app.stats.copy()
    answers = 0

    async def second_finds_them() -> None:
        # the keys reach bob's KME once its clock reads 30: after its first answer
        nonlocal answers
        answers += 1
        if answers == 2:
            SIM_CLOCK.now = 60.0

    app.before_answer = second_finds_them
    got = await _all_by_id(bob, sent)
    after = app.stats
    assert [k.key_id for k in got] == [k.key_id for k in sent]
    assert answers == 2
    assert after["400"] - before["400"] == 1  # the shared call, not found
    assert after["200"] - before["200"] == 1  # ... and made again


async def test_shared_calls_ending_one_by_one_in_a_row_pause(
    sim: Simulator, sources: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer naming an unknown key ID ends its shared call; after `SPLITS_BEFORE_PAUSE` in a
    row, shared calls with that SAE pause (a KME refusing several IDs in a way no one answer
    tells)."""
    caplog.set_level(logging.WARNING, "qkdagent_etsi014")
    alice, bob = await _pair(sim, sources, 2, not_found_retries=0)
    unknown = "00000000-0000-4000-8000-000000000000"
    for _ in range(SPLITS_BEFORE_PAUSE):
        assert not bob._sharing_paused
        sent = await alice.new_key(alice.links[0])
        results = await _together(
            [
                lambda key_id=sent.key_id: bob.key_by_id(bob.links[0], key_id),
                lambda: bob.key_by_id(bob.links[1], unknown),
            ]
        )
        assert isinstance(results[0], Key) and isinstance(results[1], KeyNotFound)
    assert set(bob._sharing_paused) == {("dec_keys", "alice")}
    assert any("in a row" in r.getMessage() for r in caplog.records)


async def test_a_key_id_no_kme_answer_could_hold_is_not_asked_for(
    sim: Simulator, sources: Any
) -> None:
    """With `strict_key_ids`, a key ID that is no UUID: `KeyNotFound` at once, no call (in a
    shared call it would end the call for the others)."""
    _, bob = await _pair(sim, sources, 1)
    before = _requests(sim, "KME_B")
    with pytest.raises(KeyNotFound, match="not acceptable"):
        await bob.key_by_id(bob.links[0], "kme-7f3a")
    assert _requests(sim, "KME_B") == before


async def test_a_key_whose_caller_left_during_the_call_is_held_for_a_repeat(
    sim: Simulator, sources: Any
) -> None:
    """One of three `dec_keys` callers sharing a call leaves while it is on the wire: the others
    get their keys, and a repeated call for the leaver's ID, once the call is over, gets the key
    held for it (the KME has deleted it) without asking again."""
    alice, bob = await _pair(sim, sources, 3)
    sent = await _all_new(alice)
    app = sim.apps["KME_B"]
    before = app.received
    hold = Hold(sim, "KME_B")
    got: list[Key] = []
    leaving = trio.CancelScope()

    async def call(index: int) -> None:
        with leaving if index == 0 else trio.CancelScope():
            got.append(await bob.key_by_id(bob.links[index], sent[index].key_id))

    async with trio.open_nursery() as nursery:
        for index in range(3):
            nursery.start_soon(call, index)
        await until(lambda: app.received > before)
        fetch = _running(bob)[0]
        assert len(fetch.claims) == 3
        leaving.cancel()
        await until(lambda: fetch.claims[sent[0].key_id] == 0)
        hold.release.set()
    assert leaving.cancelled_caught and not bob._fetches
    assert sorted(k.key_id for k in got) == sorted(k.key_id for k in sent[1:])
    assert set(bob._held) == {("alice", sent[0].key_id)}
    assert fetch.result == []  # each key in one place: handed out, or held
    repeated = await bob.key_by_id(bob.links[0], sent[0].key_id)
    assert repeated.value.reveal() == sent[0].value.reveal()
    assert app.received - before == 1 and not bob._held
