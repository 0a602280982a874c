"""`announce` (issue 18): an initiator whose link has a remote source names the next rotation's
key IDs when it takes them ahead, and the responder fetches them before the `rotate` arrives,
so neither side's source round trip is on the rotation's path. Keys fetched ahead serve the
one rotate that names them; nothing is ever fetched or used twice."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qkdagent import protocol
from qkdagent.builtin.memory import MemoryPool
from qkdagent.initiator import ANNOUNCE_PAUSE
from qkdagent.link import prefetch_lead
from qkdagent.peering import PeerReply
from qkdagent.protocol import error_body
from qkdagent.testing import open_agent_pair

REC = {"sinks": {"rec": {"type": "recording"}}}
INTERVAL = 100.0
DELAY = 0.2
"""The pool's simulated round trip (virtual seconds) for every key it issues or gives."""
LINK = {"interval": INTERVAL, "reject_after": 3 * INTERVAL, "jitter": 0, "grid": 0}

Announce = Callable[[Any, str, str, bytes], Awaitable[PeerReply]]
"""What stands in alice's path for her announces: (client, url, link, body) -> reply."""


def _taken(pool: MemoryPool, log: list[tuple[float, str]]) -> None:
    """Record (time, key ID) of every attempt of bob's side to take a key from the pool."""
    take = pool.take

    def logged(key_id: str):  # type: ignore[no-untyped-def]
        if not pool.down:
            log.append((trio.current_time(), key_id))
        return take(key_id)

    pool.take = logged  # type: ignore[method-assign]


def _intercept(pair: Any, action: str, fn: Announce) -> list[str]:  # type: ignore[misc]
    """Route alice's `action` requests to bob through `fn`; the returned list records every
    action alice sent."""
    url = pair.configs["alice"]["links"]["alice-bob"]["peer_url"]
    seen: list[str] = []

    async def interceptor(client, peer_url, link, act, body):  # type: ignore[no-untyped-def]
        seen.append(act)
        if act == action:
            return await fn(client, peer_url, link, body)
        return await client.deliver(peer_url, link, act, body)

    assert pair.network is not None
    pair.network.interceptors[url] = interceptor
    return seen


@asynccontextmanager
async def _rotating(
    tmp_path: Path,
    on_announce: Callable[[Any, MemoryPool], Announce] | None = None,
    *,
    takes: list[tuple[float, str]] | None = None,
    fetch_ahead: bool = True,
) -> AsyncIterator[tuple[Any, MemoryPool, list[str]]]:
    """A local pair whose pool stands in for a remote source (every call takes DELAY), past
    its first rotation. `on_announce(pair, pool)` returns what alice's announces go through;
    `takes` logs bob's takes; the list yielded logs every action alice sent."""
    async with open_agent_pair(
        tmp_path, alice=REC, bob=REC, link=LINK, local=True, start=False
    ) as pair:
        for name in ("alice", "bob"):
            pair.configs[name]["sources"]["sim"]["fetch_ahead"] = fetch_ahead
        pool = MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])
        pool.delay = DELAY
        if takes is not None:
            _taken(pool, takes)
        seen = _intercept(pair, "announce", on_announce(pair, pool)) if on_announce else []
        await pair.start("bob")
        await pair.start("alice")
        await pair.wait_for_epoch(1)
        yield pair, pool, seen


def _fetched_ahead(pair: Any, result: str) -> float:  # type: ignore[misc]
    return float(pair.bob.metrics.fetched_ahead.labels("alice-bob", result).get())


def _server(pair: Any) -> Any:  # type: ignore[misc]
    """The identity bob's server presents (what alice's transport checks replies against)."""
    url = pair.configs["alice"]["links"]["alice-bob"]["peer_url"]
    return pair.network.handlers[url][1]


def _answering(status: int, code: str, *, from_peer: bool) -> Callable[[Any, Any], Announce]:
    """An announce answered with an error body, by bob's server or by another."""

    def make(pair: Any, pool: MemoryPool) -> Announce:
        async def answer(client, url, link, body):  # type: ignore[no-untyped-def]
            identity = _server(pair) if from_peer else client.identity
            return PeerReply(status, error_body(code, "no"), identity)

        return answer

    return make


async def _durations(tmp_path: Path, fetch_ahead: bool) -> tuple[list[float], list[float]]:
    """Rotation durations (alice's install time minus the due time) and bob's take times
    relative to each due time, over four rotations after the first."""
    takes: list[tuple[float, str]] = []
    async with _rotating(tmp_path, takes=takes, fetch_ahead=fetch_ahead) as (pair, pool, _):
        await trio.sleep(4 * INTERVAL + 10)
        installs = pair.sink("alice", "rec").installs
        bob_installs = pair.sink("bob", "rec").installs
        assert not pool.keys  # every key issued was taken once: none wasted
        assert [r.key_ids for r in installs] == [r.key_ids for r in bob_installs]
        used = 4 if fetch_ahead else 0  # rotations 2 to 5; the first one takes no keys ahead
        assert (_fetched_ahead(pair, "used"), _fetched_ahead(pair, "dropped")) == (used, 0)
    # each rotation is due an interval after the previous one committed
    due = [r.time + INTERVAL for r in installs[:4]]
    durations = [r.time - d for r, d in zip(installs[1:], due, strict=True)]
    offsets = [t - d for (t, _), d in zip(takes[1:], due, strict=True)]
    assert [k for _, k in takes] == [r.key_ids[0] for r in installs]
    return durations, offsets


async def test_announced_keys_are_fetched_before_the_rotation_and_leave_its_path(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    without, offsets_without = await _durations(tmp_path / "off", fetch_ahead=False)
    with_, offsets_with = await _durations(tmp_path / "on", fetch_ahead=True)
    lead = prefetch_lead(INTERVAL)
    # without: bob's fetch starts when the rotate arrives, so the rotation waits for it
    assert all(DELAY - 0.001 < d < 2 * DELAY for d in without), without
    assert all(0 < o < 2 * DELAY for o in offsets_without), offsets_without
    # with: bob fetched right after alice's prefetch, a lead before the rotation was due
    assert all(abs(o - (-lead + 2 * DELAY)) < 0.01 for o in offsets_with), offsets_with
    assert all(d < 0.01 for d in with_), with_


async def test_keys_fetched_ahead_serve_only_the_rotate_that_names_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The initiator's record changes after its announce (so its keys taken ahead are not
    used): the rotate names fresh keys, which bob fetches; the announced ones are not used."""
    takes: list[tuple[float, str]] = []
    async with _rotating(tmp_path, takes=takes) as (pair, _, _):
        await trio.sleep(INTERVAL - 0.3)  # rotation 2's keys taken and announced
        assert len(takes) == 2
        announced = takes[1][1]
        runtime = pair.alice.link("alice-bob")
        runtime.record = dataclasses.replace(runtime.record)  # same content, another record
        await pair.wait_for_epoch(2)
        used = pair.sink("bob", "rec").installs[-1].key_ids[0]
        assert used == pair.sink("alice", "rec").installs[-1].key_ids[0]
        assert pair.alice.link("alice-bob").status.failures == 0  # bob used no other key
        assert _fetched_ahead(pair, "dropped") == 1
    assert used != announced and [k for _, k in takes] == [takes[0][1], announced, used]


async def test_keys_fetched_ahead_are_not_used_once_the_responders_record_changed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """They were fetched for the record (epoch, source state) the announce was checked
    against: from any other, the rotate fetches for itself (here the source no longer has the
    key, so that attempt fails and the next one takes fresh keys)."""
    takes: list[tuple[float, str]] = []
    async with _rotating(tmp_path, takes=takes) as (pair, _, _):
        await trio.sleep(INTERVAL - 0.3)
        assert len(takes) == 2
        runtime = pair.bob.link("alice-bob")
        runtime.record = dataclasses.replace(runtime.record)
        await pair.wait_for_epoch(2)
        assert pair.alice.link("alice-bob").status.failures == 1
    announced = takes[1][1]
    assert [k for _, k in takes].count(announced) == 2  # asked again, not taken from memory


def _twice(pair: Any, pool: MemoryPool) -> Announce:
    async def twice(client, url, link, body):  # type: ignore[no-untyped-def]
        first = await client.deliver(url, link, "announce", body)
        again = await client.deliver(url, link, "announce", body)
        assert first.status == again.status == 200
        return again

    return twice


async def test_a_repeated_announce_fetches_nothing_twice(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    takes: list[tuple[float, str]] = []
    async with _rotating(tmp_path, _twice, takes=takes) as (pair, _, seen):
        await trio.sleep(3 * INTERVAL + 10)
        assert pair.epoch("bob") == 4
    assert seen.count("announce") == 3
    keys = [k for _, k in takes]
    assert len(keys) == 4 and len(set(keys)) == 4  # one take per rotation, none repeated


def _forged(announce: bytes, kind: str) -> bytes:
    """A `kind` naming the announce's keys under a MAC nobody computed, as a holder of alice's
    certificate without the link's keys could send."""
    fields = json.loads(announce)
    fields.update(kind=kind, labels=[], mac=base64.b64encode(os.urandom(32)).decode())
    return protocol.canonical(fields)


def _then_forged_rotates(statuses: list[int]) -> Callable[..., Announce]:
    """Each announce delivered, then a forged rotate and resync naming its keys (review
    finding: such a rotate, refused, still took and dropped the keys bob had fetched ahead).
    `statuses` gets their answers' statuses."""

    def make(pair: Any, pool: MemoryPool) -> Announce:
        async def forged(client, url, link, body):  # type: ignore[no-untyped-def]
            reply = await client.deliver(url, link, "announce", body)
            for kind in ("rotate", "resync"):
                refused = await client.deliver(url, link, kind, _forged(body, kind))
                statuses.append(refused.status)
            return reply

        return forged

    return make


async def test_a_forged_rotate_leaves_the_keys_fetched_ahead_for_the_real_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    statuses: list[int] = []
    async with _rotating(tmp_path, _then_forged_rotates(statuses)) as (pair, pool, seen):
        await trio.sleep(3 * INTERVAL + 10)
        assert statuses == [403, 403] * 3  # both refused: their MACs do not verify (auth)
        assert pair.epoch("bob") == 4
        assert (_fetched_ahead(pair, "used"), _fetched_ahead(pair, "dropped")) == (3, 0)
        assert pair.alice.link("alice-bob").status.failures == 0
        assert not pool.keys
    assert seen.count("announce") == 3


def _then_expired_and_forged(seen: list[tuple[int, bool, bool]]) -> Callable[..., Announce]:
    """Each announce delivered; then, the keys it had fetched put past their `expires`, a
    forged rotate (refused). `seen` gets (its status, held before, held after)."""

    def make(pair: Any, pool: MemoryPool) -> Announce:
        async def expired(client, url, link, body):  # type: ignore[no-untyped-def]
            reply = await client.deliver(url, link, "announce", body)
            responder = pair.bob.link("alice-bob").responder
            held = responder._ahead is not None and bool(responder._ahead.answered)
            if responder._ahead is not None:
                responder._ahead.expires = trio.current_time() - 1
            refused = await client.deliver(url, link, "rotate", _forged(body, "rotate"))
            seen.append((refused.status, held, responder._ahead is not None))
            return reply

        return expired

    return make


async def test_keys_fetched_ahead_are_dropped_by_the_first_request_after_they_expire(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Review finding: since refused rotates leave them, keys held past `expires` with no
    rotate accepted (a link that failed closed, a labels mismatch) stayed in memory."""
    forged: list[tuple[int, bool, bool]] = []
    async with _rotating(tmp_path, _then_expired_and_forged(forged)) as (pair, _, seen):
        await trio.sleep(INTERVAL + 10)
        assert forged == [(403, True, False)]  # held, then dropped by the forged request
        assert _fetched_ahead(pair, "dropped") == 1 and _fetched_ahead(pair, "used") == 0
        assert pair.epoch("bob") == 2  # the real rotate fetched its key again
    assert seen.count("announce") == 1


def _while_down(pair: Any, pool: MemoryPool) -> Announce:
    async def while_down(client, url, link, body):  # type: ignore[no-untyped-def]
        pool.down = True
        try:
            return await client.deliver(url, link, "announce", body)
        finally:
            pool.down = False

    return while_down


async def test_a_source_that_fails_ahead_is_asked_again_by_the_rotate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _rotating(tmp_path, _while_down) as (pair, pool, _):
        await trio.sleep(2 * INTERVAL + 10)
        assert pair.epoch("alice") == pair.epoch("bob") == 3
        assert pair.alice.link("alice-bob").status.failures == 0
        assert not pool.keys


async def test_a_peer_without_announce_is_asked_again_only_after_a_pause(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An older responder answers 404 "not-found" (unknown path): the initiator stops
    announcing on that link for ANNOUNCE_PAUSE, rotating as before, then asks again (the peer
    may have been upgraded)."""
    unknown = _answering(404, "not-found", from_peer=True)
    async with _rotating(tmp_path, unknown) as (pair, _, seen):
        await trio.sleep(3 * INTERVAL + 10)
        assert pair.epoch("bob") == 4
        assert pair.alice.link("alice-bob").status.failures == 0
        assert seen.count("announce") == 1
        await trio.sleep(ANNOUNCE_PAUSE)
        assert seen.count("announce") == 2


@pytest.mark.parametrize(
    ("status", "code", "from_peer"),
    [(404, "not-found", False), (503, "busy", True)],
    ids=["not-found from a server that is not the peer", "busy"],
)
async def test_any_other_answer_to_an_announce_keeps_announcing(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    status: int,
    code: str,
    from_peer: bool,
) -> None:
    """Only the peer's own "not-found" pauses announcing; a stranger's (unauthenticated) or
    any other refusal is one lost announce, and the rotations go on."""
    answer = _answering(status, code, from_peer=from_peer)
    async with _rotating(tmp_path, answer) as (pair, _, seen):
        await trio.sleep(3 * INTERVAL + 10)
        assert pair.epoch("bob") == 4
    assert seen.count("announce") == 3


def _too_slow(pair: Any, pool: MemoryPool) -> Announce:
    async def too_slow(client, url, link, body):  # type: ignore[no-untyped-def]
        await client.deliver(url, link, "announce", body)
        raise trio.TooSlowError

    return too_slow


async def test_an_announce_that_times_out_is_no_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The peer client's own deadline (trio.TooSlowError) ends the announce like a lost
    reply: nothing is reported, and the rotation is on time."""
    async with _rotating(tmp_path, _too_slow) as (pair, _, _):
        await trio.sleep(3 * INTERVAL + 10)
        status = pair.alice.link("alice-bob").status
        assert pair.epoch("bob") == 4
        assert status.failures == 0 and status.last_error is None


def _then_gone(pair: Any, pool: MemoryPool) -> Announce:
    bob_url = pair.configs["alice"]["links"]["alice-bob"]["peer_url"]

    async def then_gone(client, url, link, body):  # type: ignore[no-untyped-def]
        reply = await client.deliver(url, link, "announce", body)
        pair.network.down.add(bob_url)  # the rotate never arrives
        return reply

    return then_gone


async def test_keys_fetched_ahead_are_dropped_when_the_link_fails_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The initiator announced and never rotated: the responder's reject_after erase also
    forgets the keys it fetched for that rotation."""
    async with _rotating(tmp_path, _then_gone) as (pair, _, _):
        await trio.sleep(INTERVAL)
        responder = pair.bob.link("alice-bob").responder
        assert responder._ahead is not None and responder._ahead.answered
        await trio.sleep(3 * INTERVAL)
        assert pair.bob.link("alice-bob").status.erased_reason == "reject_after"
        assert responder._ahead is None
        assert _fetched_ahead(pair, "dropped") == 1
