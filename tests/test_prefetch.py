"""The initiator takes its source keys shortly before a rotation is due (issue 18), and a key
taken ahead serves one attempt from the record it was taken for, never two."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing

from qkdagent.link import prefetch_lead
from qkdagent.testing import MemoryPool, open_agent_pair

REC = {"sinks": {"rec": {"type": "recording"}}}
INTERVAL = 100.0


@asynccontextmanager
async def _running_pair(
    tmp_path: Path, *, epoch: int = 1, **link: object
) -> AsyncIterator[tuple[Any, list[tuple[float, str]], MemoryPool]]:
    """A pair once it committed `epoch` (0: as soon as both started), with the log of the
    keys alice's source hands out."""
    options = {"interval": INTERVAL, "reject_after": 3 * INTERVAL, "jitter": 0, **link}
    log: list[tuple[float, str]] = []
    async with open_agent_pair(
        tmp_path, alice=REC, bob=REC, link=options, local=True, start=False
    ) as pair:
        pool = _issued(pair, log)
        await pair.start("bob")
        await pair.start("alice")
        if epoch:
            await pair.wait_for_epoch(epoch)
        yield pair, log, pool


def _issued(pair, log: list[tuple[float, str]]) -> MemoryPool:  # type: ignore[no-untyped-def]
    """Record (time, key ID) of every key alice's source hands out."""
    pool = MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])
    issue = pool.issue

    def logged():  # type: ignore[no-untyped-def]
        log.append((trio.current_time(), ""))  # before: a pool that is down raises
        key = issue()
        log[-1] = (log[-1][0], key.key_id)
        return key

    pool.issue = logged  # type: ignore[method-assign]
    return pool


async def test_keys_are_taken_a_lead_ahead_and_used_by_the_rotation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _running_pair(tmp_path, epoch=0) as (pair, log, pool):
        start = trio.current_time()
        await trio.sleep(5 * INTERVAL + 10)  # rotations at 0, 100, ..., 500
        installs = pair.sink("alice", "rec").installs
        committed = [r.key_ids[0] for r in installs]
    lead = prefetch_lead(INTERVAL)
    assert len(installs) == 6 and committed == [key_id for _, key_id in log]
    assert not pool.keys  # every key taken was used: none wasted, none used twice
    # each rotation after the first used a key taken `lead` before it was due
    for n, (at, _) in enumerate(log[1:], start=1):
        assert abs((at - start) - (n * INTERVAL - lead)) < 0.01, (n, at - start)
    # ... and the rotations themselves kept their schedule
    for n, record in enumerate(installs):
        assert abs((record.time - start) - n * INTERVAL) < 0.01, (n, record.time - start)


async def test_a_failed_attempt_never_reuses_keys_taken_ahead(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _running_pair(tmp_path) as (pair, log, pool):
        assert pair.network is not None
        bob_url = pair.configs["alice"]["links"]["alice-bob"]["peer_url"]
        # bob unreachable from just after the prefetch of rotation 2 until a while later
        await trio.sleep(INTERVAL - 0.5)
        assert len(log) == 2  # the keys for rotation 2 were taken ahead
        pair.network.down.add(bob_url)
        await trio.sleep(20)
        pair.network.down.discard(bob_url)
        await pair.wait_for_epoch(2, timeout=200)
        ids = [key_id for _, key_id in log]
        assert len(ids) == len(set(ids))  # no key ID handed out or sent twice
        assert len(log) >= 3  # the retries took fresh keys
        epoch2 = pair.sink("alice", "rec").installs[-1].key_ids[0]
        assert epoch2 != log[1][1]  # not the keys the failed attempt sent
        assert pool.keys.keys() >= {key_id for _, key_id in log[1:-1]}  # sent, never taken


async def test_a_failing_source_is_not_asked_twice_per_attempt(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _running_pair(tmp_path, backoff_max=8) as (pair, log, pool):
        pool.down = True
        calls_before = len(log)
        failures_before = pair.alice.link("alice-bob").status.failures
        await trio.sleep(INTERVAL + 60)
        failures = pair.alice.link("alice-bob").status.failures - failures_before
        calls = len(log) - calls_before
    assert failures >= 5
    assert calls == failures + 1  # one prefetch before the due time, then one per attempt


async def test_keys_taken_ahead_serve_only_the_record_they_were_taken_for(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """If the link's committed record changes between the prefetch and the rotation (another
    epoch, a resync, new source state), the keys taken ahead are not used."""
    import dataclasses

    async with _running_pair(tmp_path) as (pair, log, _):
        await trio.sleep(INTERVAL - 0.5)  # rotation 2's keys were taken ahead
        assert len(log) == 2
        runtime = pair.alice.link("alice-bob")
        runtime.record = dataclasses.replace(runtime.record)  # same content, another record
        await pair.wait_for_epoch(2)
        used = pair.sink("alice", "rec").installs[-1].key_ids[0]
    assert len(log) == 3 and used == log[2][1] != log[1][1]


async def test_the_rotate_is_built_with_its_keys_ahead_and_serves_one_attempt(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The prefetch also builds the `rotate` naming its keys (off the rotation's path). That
    message is sent by one attempt (and its retransmissions) only: the next attempt sends
    another, with fresh keys and a fresh nonce."""
    from qkdagent import protocol
    from qkdagent.testing.hostile import Exchange, ManInTheMiddle

    async with _running_pair(tmp_path) as (pair, log, _):
        mitm = ManInTheMiddle.on(pair, "bob")
        sent: list[tuple[float, bytes]] = []

        async def fail_first_attempt(exchange: Exchange) -> object:
            if exchange.action != "rotate":
                return await exchange.forward()
            sent.append((trio.current_time(), exchange.body))
            if len(sent) <= 3:  # every retransmission of the first attempt
                return exchange.forged(500, b"{}")
            return await exchange.forward()

        mitm.tamper = fail_first_attempt  # type: ignore[assignment]
        await trio.sleep(INTERVAL - 0.5)  # rotation 2's keys were taken ahead
        prepared = pair.alice.link("alice-bob").initiator._prefetched
        assert prepared is not None and not sent
        await pair.wait_for_epoch(2, timeout=2 * INTERVAL)
    first, retry = (protocol.parse(body, expect=("rotate",)) for body in (sent[0][1], sent[3][1]))
    assert [body for _, body in sent[:3]] == [prepared.body] * 3  # built ahead, retransmitted
    assert first.keys == (("sim", log[1][1]),)
    assert retry.nonce != first.nonce and retry.keys != first.keys
    assert retry.keys == (("sim", pair.sink("alice", "rec").installs[-1].key_ids[0]),)


async def test_a_link_that_announces_nothing_has_its_connection_made_ahead(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Without an announce (no source fetches ahead), the prefetch asks the client to have a
    connection to the peer ready (at the default interval the client has dropped the last
    one, and its TLS handshake came on the rotation's path), a lead before each rotation."""
    async with _running_pair(tmp_path) as (pair, log, _):
        network = pair.network
        bob_url = pair.alice.link("alice-bob").config.peer_url
        start = trio.current_time()
        network.warmed.clear()
        await trio.sleep(3 * INTERVAL + 10)
        installs = pair.sink("alice", "rec").installs
    assert list(network.warmed) == [bob_url] * 3  # once per rotation after the first
    assert [r.key_ids[0] for r in installs] == [key_id for _, key_id in log]
    assert all(abs(r.time - start - n * INTERVAL) < 1 for n, r in enumerate(installs[1:], 1))


async def test_no_connection_is_asked_for_ahead_when_the_client_needs_none(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that keeps a fresh connection to the peer, or has a request to it under way
    (the usual case at many links), is not asked to make one: no timeouts are set up for a
    call that would do nothing. The rotations are as before."""
    async with _running_pair(tmp_path) as (pair, log, _):
        network = pair.network
        client = pair.alice.link("alice-bob").env.client
        asked: list[str] = []

        def needs_none(peer_url: str) -> bool:
            asked.append(peer_url)
            return False

        client.needs_warm = needs_none
        network.warmed.clear()
        start = trio.current_time()
        await trio.sleep(3 * INTERVAL + 10)
        installs = pair.sink("alice", "rec").installs
    assert asked == [pair.alice.link("alice-bob").config.peer_url] * 3 and not network.warmed
    assert [r.key_ids[0] for r in installs] == [key_id for _, key_id in log]
    assert all(abs(r.time - start - n * INTERVAL) < 1 for n, r in enumerate(installs[1:], 1))


async def test_a_client_that_cannot_say_whether_it_needs_a_connection_is_asked_for_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """`needs_warm` raising (a bug, or a URL the client refuses) leaves the decision to `warm`,
    which meets the same problem and reports it, as before there was a `needs_warm`."""
    async with _running_pair(tmp_path) as (pair, _, _):
        network = pair.network
        client = pair.alice.link("alice-bob").env.client

        def broken(peer_url: str) -> bool:
            raise RuntimeError("a bug")

        client.needs_warm = broken
        network.warmed.clear()
        await trio.sleep(2 * INTERVAL + 10)
        bob_url = pair.alice.link("alice-bob").config.peer_url
        epoch = pair.alice.link("alice-bob").record.epoch
    assert list(network.warmed) == [bob_url] * 2 and epoch == 3


async def test_a_peer_that_cannot_be_reached_ahead_still_gets_its_rotation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A connection that cannot be made ahead changes nothing: the rotation is on time and
    tries (and reports) for itself."""
    async with _running_pair(tmp_path) as (pair, _, _):
        network = pair.network
        bob_url = pair.alice.link("alice-bob").config.peer_url
        start = trio.current_time()
        network.down.add(bob_url)
        await trio.sleep(INTERVAL - 0.5)  # the prefetch of rotation 2 tried, and failed
        assert network.warmed[-1] == bob_url
        status = pair.alice.link("alice-bob").status
        assert status.failures == 0 and status.last_error is None  # nothing to report yet
        network.down.discard(bob_url)
        await pair.wait_for_epoch(2)
        assert trio.current_time() - start < INTERVAL + 1


async def test_a_connection_that_hangs_ahead_never_holds_the_rotation_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Making the connection ahead stops when the rotation is due (a peer that takes the TCP
    connection and never finishes the TLS handshake): the rotation starts on time."""
    async with _running_pair(tmp_path) as (pair, _, _):
        runtime = pair.alice.link("alice-bob")
        hung: list[float] = []

        async def hang(peer_url: str) -> None:
            hung.append(trio.current_time())
            await trio.sleep_forever()

        runtime.env.client.warm = hang
        start = trio.current_time()
        await trio.sleep(2 * INTERVAL + 10)  # rotations 2 and 3, each after a hung warm
        installs = pair.sink("alice", "rec").installs
    assert len(hung) == 2 and runtime.record.epoch == 3
    for n, record in enumerate(installs[-2:], start=1):
        assert abs(record.time - start - n * INTERVAL) < 0.5, (n, record.time - start)
