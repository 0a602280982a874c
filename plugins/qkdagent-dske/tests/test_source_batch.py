"""The `dske` source's batching over loopback HTTPS: concurrent keys coalesced into batches at
hubs that serve them (and less PSRD per key), one request per share at hubs that do not
(dske-python's 404), and the fall-back when a hub stops serving batches."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent_dske import shamir
from qkdagent_dske.hubapp import Hub, Request, Response
from qkdagent_dske.source import DskeSource, Fetched

from qkdagent import ComponentEvent, Key, SourceUnavailable
from qkdagent.testing import build_component, running

from .hubs import ForgingHub, ReorderingHub, hub_table, open_hubs
from .test_source import ALICE, BOB

NAMES = ["hank", "helen", "hilary"]
KEYS = 40


def sources(tmp_path: Path, pki: Any, hubs: Any, **extra: Any) -> tuple[DskeSource, DskeSource]:
    def one(agent: str) -> DskeSource:
        table = {"hubs": hub_table(pki, hubs, agent), "k": 2, "refill_every": 3600, **extra}
        return build_component(
            DskeSource, table, name="dske", agent=agent, state_dir=tmp_path / agent
        )

    return one("alice"), one("bob")


def free(*clients: DskeSource) -> int:
    return sum(c.psrd.free(h, o) for c in clients for h in NAMES for o in ("client", "hub"))


async def round_trip(alice: DskeSource, bob: DskeSource, count: int) -> None:
    """`count` keys made at once, then fetched at once; every pair identical."""
    made: list[Key] = []
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(lambda: _append(made, alice.new_key(ALICE)))
    got: dict[str, Key] = {}

    async def fetch(key_id: str) -> None:
        got[key_id] = await bob.key_by_id(BOB, key_id)

    async with trio.open_nursery() as nursery:
        for key in made:
            nursery.start_soon(fetch, key.key_id)
    assert len(made) == count and all(got[k.key_id].value == k.value for k in made)


async def _append(out: list[Key], call: Any) -> None:
    out.append(await call)


async def test_concurrent_keys_go_in_batches_and_spend_less_psrd(tmp_path: Path) -> None:
    async with open_hubs(tmp_path, NAMES) as (pki, hubs):
        alice, bob = sources(tmp_path, pki, hubs)
        async with running(alice, bob):
            assert set(alice.batching) == set(bob.batching) == set(NAMES)  # probed at start
            before = free(alice, bob)
            await round_trip(alice, bob, KEYS)
            batched = before - free(alice, bob)
            for hub in NAMES:
                assert 1 <= alice.batches_sent["post", hub] < KEYS
                assert 1 <= bob.batches_sent["fetch", hub] < KEYS
            alice.batching.clear()  # as against hubs without batches: one request per share
            bob.batching.clear()
            before = free(alice, bob)
            await round_trip(alice, bob, KEYS)
            single = before - free(alice, bob)
    assert single == KEYS * len(NAMES) * (2 * 32 + 4 * 32)  # dske-python's 192 B per hub
    # a pad each way per hub, and the batches' signatures shared by their keys
    assert KEYS * len(NAMES) * 2 * 32 < batched < single / 2


async def test_hubs_without_batches_get_one_request_per_share(tmp_path: Path) -> None:
    async with open_hubs(tmp_path, NAMES) as (pki, hubs):
        for hub in hubs:  # restarted as dske-python-like hubs, before the clients start
            hub.batches = False
            await hub.restart()
        alice, bob = sources(tmp_path, pki, hubs)
        async with running(alice, bob):
            assert alice.unbatched == bob.unbatched == set(NAMES) and not alice.batching
            await round_trip(alice, bob, 5)
            assert not alice.batches_sent and not bob.batches_sent


async def test_a_hub_that_stops_serving_batches_gets_single_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qkdagent.dske")
    async with open_hubs(tmp_path, NAMES) as (pki, hubs):
        alice, bob = sources(tmp_path, pki, hubs)
        async with running(alice, bob):
            await round_trip(alice, bob, 2)
            hubs[0].batches = False  # hank comes back without the batch routes
            await hubs[0].restart()
            key = await alice.new_key(ALICE)  # its batch is refused: 2 of 3 hubs take it
            assert "hank" not in alice.batching and "no longer serves batches" in caplog.text
            assert hubs[0].hub is not None and not hubs[0].hub.shares
            await alice.refill()  # the next refill probes again: 404
            assert "hank" in alice.unbatched
            assert (await bob.key_by_id(BOB, key.key_id)).value == key.value
            assert "hank" not in bob.batching  # its batch fetch got the 404
            await bob.refill()
            assert "hank" in bob.unbatched
            key = await alice.new_key(ALICE)
            assert len(hubs[0].hub.shares) == 1  # a single POST reached hank
            assert (await bob.key_by_id(BOB, key.key_id)).value == key.value
            assert not hubs[0].hub.shares


class Progress:
    """Wait for a condition that other tasks change (they call `notify`), without sleeping."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()


async def test_a_caller_that_leaves_cuts_no_batch_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key 1's caller times out while key 1 heads a batch fetch with key 2, after the hubs
    delivered (and deleted) both shares: key 2 still gets its key, and a retry of key 1
    rebuilds it from the shares kept for it, without asking any hub again."""
    progress = Progress()
    gates: list[trio.Event] = []
    real = Hub._fetch_batch

    async def gated(self: Hub, request: Request) -> Response:
        response = await real(self, request)  # delivered: the shares are deleted, durably
        gate = trio.Event()
        gates.append(gate)
        progress.notify()
        await gate.wait()  # the answer is slow on its way back
        return response

    monkeypatch.setattr(Hub, "_fetch_batch", gated)
    async with open_hubs(tmp_path, NAMES) as (pki, hubs):
        alice, bob = sources(tmp_path, pki, hubs)
        async with running(alice, bob):
            keys = [await alice.new_key(ALICE) for _ in range(3)]
            submitted: list[str] = []
            submit = bob.fetcher.submit

            async def noted(item: tuple[str, frozenset[str]]) -> dict[str, Any]:
                submitted.append(item[0])
                progress.notify()  # it queues before its waiter runs again
                return await submit(item)

            monkeypatch.setattr(bob.fetcher, "submit", noted)
            got: dict[int, Key] = {}
            timeout = trio.CancelScope()

            async def fetch(i: int) -> None:
                got[i] = await bob.key_by_id(BOB, keys[i].key_id)
                progress.notify()

            async def times_out() -> None:
                with timeout:
                    await fetch(1)
                progress.notify()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch, 0)
                await progress.until(lambda: len(gates) == len(NAMES))  # key 0's batch
                nursery.start_soon(times_out)  # key 1 queues first: it heads the next batch
                await progress.until(lambda: keys[1].key_id in submitted)
                nursery.start_soon(fetch, 2)
                await progress.until(lambda: keys[2].key_id in submitted)
                for gate in gates:
                    gate.set()
                await progress.until(lambda: len(gates) == 2 * len(NAMES))  # keys 1 and 2
                assert 0 in got and all(not h.hub.shares for h in hubs if h.hub)
                timeout.cancel()
                await progress.until(lambda: timeout.cancelled_caught)
                for gate in gates:
                    gate.set()
            assert got[0].value == keys[0].value and got[2].value == keys[2].value
            assert 1 not in got
            sent = sum(bob.batches_sent.values())
            assert (await bob.key_by_id(BOB, keys[1].key_id)).value == keys[1].value
            assert sum(bob.batches_sent.values()) == sent  # rebuilt from the shares kept


async def test_without_its_task_the_source_sends_one_request_per_share(tmp_path: Path) -> None:
    """Batches are sent by the source's run() task; before it starts (or while the agent
    restarts it) keys still go through, one request per share."""
    async with open_hubs(tmp_path, NAMES) as (pki, hubs):
        alice, bob = sources(tmp_path, pki, hubs)
        try:
            await alice.prepare()
            await bob.prepare()
            assert set(alice.batching) == set(NAMES) and not alice.poster.serving
            await round_trip(alice, bob, 3)
            assert not alice.batches_sent and not bob.batches_sent
        finally:
            await alice.aclose()
            await bob.aclose()


async def test_a_hub_that_takes_small_batches_limits_only_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One hub's probe answer (2 items) bounds the batches to that hub, which gets each batch
    in parts; the other hubs still get the whole batch in one request."""
    sizes: dict[str, list[int]] = {n: [] for n in NAMES}
    real = Hub.handle

    async def recording(self: Hub, request: Request) -> Response:
        if request.method == "POST" and request.path.endswith(("/key-shares", "-fetch")):
            batch = json.loads(request.body)
            sizes[self.settings.name].append(len(batch.get("shares", batch.get("key_ids"))))
        return await real(self, request)

    monkeypatch.setattr(Hub, "handle", recording)
    async with open_hubs(tmp_path, NAMES) as (pki, hubs):
        hubs[0].small_batches = True
        await hubs[0].restart()
        alice, bob = sources(tmp_path, pki, hubs)
        async with running(alice, bob):
            assert alice.batching["hank"] == 2 and alice.batching["helen"] > 2
            await round_trip(alice, bob, 12)
    assert max(sizes["hank"]) <= 2 and sum(sizes["hank"]) == 2 * 12  # every share, in parts
    assert max(sizes["helen"]) > 2 and max(sizes["hilary"]) > 2


async def test_a_hub_that_reorders_its_signed_fetch_answer_fails_its_own_shares_only(
    tmp_path: Path,
) -> None:
    """Its answer, correctly signed, pairs shares with the wrong key IDs: the client refuses
    that hub's answer as a whole (no share of it used, no lying hub to outvote), and the
    shares of the other hubs rebuild each key."""
    async with open_hubs(tmp_path, NAMES) as (pki, hubs):
        hubs[0].kind = ReorderingHub
        await hubs[0].restart()
        alice, bob = sources(tmp_path, pki, hubs)
        events: list[ComponentEvent] = []
        object.__setattr__(bob.context, "reporter", events.append)
        async with running(alice, bob):
            keys = [await alice.new_key(ALICE) for _ in range(3)]
            asked = [(k.key_id, frozenset(NAMES)) for k in keys]
            results = await bob._fetch_all(asked)  # one batch of three keys at each hub
            assert isinstance(hubs[0].hub, ReorderingHub) and hubs[0].hub.reordered == 1
            for key, got in zip(keys, results, strict=True):
                assert "not the ones asked" in str(got["hank"])
                shares = [(f.share_index, f.value) for h, f in got.items() if h != "hank"]
                assert all(isinstance(f, Fetched) for h, f in got.items() if h != "hank")
                assert shamir.recover(sorted(shares)) == key.value.reveal()
        assert not events


async def test_a_forged_batch_post_answer_does_not_count_as_taken(tmp_path: Path) -> None:
    """The hub stored the share, but its answer's signature is forged: with k = n the key
    fails (retryable), as that hub's share cannot be counted."""
    async with open_hubs(tmp_path, NAMES) as (pki, hubs):
        hubs[0].kind = ForgingHub
        await hubs[0].restart()
        alice, bob = sources(tmp_path, pki, hubs, k=3)
        async with running(alice, bob):
            assert "hank" in alice.batching
            with pytest.raises(SourceUnavailable, match="only 2 of 3 hubs took a share"):
                await alice.new_key(ALICE)
            assert hubs[0].hub is not None and len(hubs[0].hub.shares) == 1
