"""The `dske` source against our hubs over loopback HTTPS: k-of-n, hubs down, lying hubs,
PSRD exhaustion and refill, a hub restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qkdagent_dske.source import DskeSource

from qkdagent import ComponentEvent, KeyNotFound, Link, Misconfigured, SourceUnavailable
from qkdagent.testing import build_component, encrypted_key_copy, running, write_test_pki

from .hubs import RunningHub, hub_table, open_hubs

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)
NAMES = ["hank", "helen", "hilary", "holly", "hugo"]


class Pair:
    def __init__(self, alice: DskeSource, bob: DskeSource, hubs: list[RunningHub]) -> None:
        self.alice, self.bob, self.hubs = alice, bob, hubs
        self.events: list[ComponentEvent] = []


def source(
    tmp_path: Path, pki: Any, hubs: list[RunningHub], agent: str, **extra: Any
) -> DskeSource:
    table = {"hubs": hub_table(pki, hubs, agent), "refill_every": 3600, **extra}
    return build_component(DskeSource, table, name="dske", agent=agent, state_dir=tmp_path / agent)


@pytest.fixture
async def pair(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    names, extra = getattr(request, "param", (NAMES, {}))
    async with open_hubs(tmp_path, names) as (pki, hubs):
        alice = source(tmp_path, pki, hubs, "alice", **extra)
        bob = source(tmp_path, pki, hubs, "bob", **extra)
        result = Pair(alice, bob, hubs)
        for s in (alice, bob):
            object.__setattr__(s.context, "reporter", result.events.append)
        async with running(alice, bob):
            yield result


async def test_3_of_5_round_trips(pair: Pair) -> None:
    for _ in range(5):
        key = await pair.alice.new_key(ALICE)
        same = await pair.bob.key_by_id(BOB, key.key_id)
        assert same.value == key.value and len(key.value.reveal()) == 32
    assert not pair.events


@pytest.mark.parametrize("pair", [(NAMES[:3], {"k": 2})], indirect=True)
async def test_2_of_3_round_trips(pair: Pair) -> None:
    key = await pair.alice.new_key(ALICE)
    assert (await pair.bob.key_by_id(BOB, key.key_id)).value == key.value


async def test_n_minus_k_hubs_down(pair: Pair) -> None:
    pair.hubs[0].stop()
    pair.hubs[3].stop()
    key = await pair.alice.new_key(ALICE)
    assert (await pair.bob.key_by_id(BOB, key.key_id)).value == key.value


async def test_too_many_hubs_down_is_retryable(pair: Pair) -> None:
    for hub in pair.hubs[:3]:
        hub.stop()
    with pytest.raises(SourceUnavailable, match="only 2 of 5 hubs took a share"):
        await pair.alice.new_key(ALICE)


async def test_responder_keeps_shares_for_the_retry(pair: Pair) -> None:
    key = await pair.alice.new_key(ALICE)
    for hub in pair.hubs[:3]:
        hub.stop()
    with pytest.raises(SourceUnavailable, match="2 shares, 3 needed"):
        await pair.bob.key_by_id(BOB, key.key_id)
    await pair.hubs[0].start()  # the two delivered shares are gone from their hubs now
    assert (await pair.bob.key_by_id(BOB, key.key_id)).value == key.value


def lie(hub: RunningHub, key_id: str) -> None:
    """The hub changes the share it holds (in memory and on disk), as a malicious hub would."""
    assert hub.hub is not None
    ((_slot, share),) = [(k, s) for k, s in hub.hub.shares.items() if k[1] == key_id]
    share.value = bytes([share.value[0] ^ 0x5A]) + share.value[1:]
    hub.hub.db.execute([("UPDATE shares SET value = ? WHERE key_id = ?", (share.value, key_id))])


async def test_a_lying_hub_is_detected_and_left_out(pair: Pair) -> None:
    key = await pair.alice.new_key(ALICE)
    lie(pair.hubs[0], key.key_id)
    assert (await pair.bob.key_by_id(BOB, key.key_id)).value == key.value
    assert [(e.kind, "hank" in e.detail) for e in pair.events] == [("lying_hub", True)]


async def test_a_liar_among_exactly_k_shares_is_a_retryable_error(pair: Pair) -> None:
    key = await pair.alice.new_key(ALICE)
    lie(pair.hubs[0], key.key_id)
    pair.hubs[3].stop()
    pair.hubs[4].stop()
    with pytest.raises(SourceUnavailable, match="agree"):
        await pair.bob.key_by_id(BOB, key.key_id)


async def test_unknown_key_is_not_found(pair: Pair) -> None:
    with pytest.raises(KeyNotFound):
        await pair.bob.key_by_id(BOB, "00000000-0000-4000-8000-000000000000")
    with pytest.raises(KeyNotFound):
        await pair.bob.key_by_id(BOB, "../etc/passwd")


async def test_a_restarted_hub_loses_no_share(pair: Pair) -> None:
    key = await pair.alice.new_key(ALICE)
    for hub in pair.hubs:
        await hub.restart()
    assert (await pair.bob.key_by_id(BOB, key.key_id)).value == key.value


@pytest.mark.parametrize(
    "pair", [(NAMES[:3], {"k": 2, "psrd_block_size": 4096, "psrd_low_water": 0})], indirect=True
)
async def test_psrd_exhaustion_then_refill(pair: Pair) -> None:
    keys = 0
    with pytest.raises(SourceUnavailable, match="PSRD exhausted"):
        while True:  # 4096 client-owned bytes per hub, 64 per share post: 64 keys
            key = await pair.alice.new_key(ALICE)
            assert (await pair.bob.key_by_id(BOB, key.key_id)).value == key.value
            keys += 1
            assert keys <= 64
    assert keys == 64
    pair.alice.low_water = pair.bob.low_water = 4096
    await pair.alice.refill()
    await pair.bob.refill()
    key = await pair.alice.new_key(ALICE)
    assert (await pair.bob.key_by_id(BOB, key.key_id)).value == key.value


async def test_pools_survive_a_restart_without_reuse(tmp_path: Path) -> None:
    async with open_hubs(tmp_path, NAMES[:3]) as (pki, hubs):
        alice = source(tmp_path, pki, hubs, "alice", k=2)
        bob = source(tmp_path, pki, hubs, "bob", k=2)
        async with running(alice, bob):
            first = await alice.new_key(ALICE)
            await bob.key_by_id(BOB, first.key_id)
            used = alice.psrd.free("hank", "client")
        alice = source(tmp_path, pki, hubs, "alice", k=2)
        bob = source(tmp_path, pki, hubs, "bob", k=2)
        async with running(alice, bob):
            assert alice.psrd.free("hank", "client") == used  # nothing handed out again
            key = await alice.new_key(ALICE)  # the hub would refuse reused PSRD (409)
            assert (await bob.key_by_id(BOB, key.key_id)).value == key.value


async def test_unloadable_tls_files_are_a_configuration_error(tmp_path: Path) -> None:
    """A garbled certificate is Misconfigured at prepare, naming the hub, not a raw SSLError."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    hubs = {
        n: {"url": f"https://127.0.0.1:9/{n}", "ca": str(garbage), "cert": str(garbage)}
        for n in ("hank", "helen")
    }
    src = build_component(
        DskeSource, {"hubs": hubs}, name="dske", agent="alice", state_dir=tmp_path / "alice"
    )
    try:
        with pytest.raises(Misconfigured, match="hub hank: cannot load TLS files"):
            await src.prepare()
    finally:
        await src.aclose()


async def test_an_encrypted_hub_client_key_is_refused_not_prompted_for(tmp_path: Path) -> None:
    """OpenSSL would ask for the passphrase on the terminal (an agent started from one hung
    at prepare): the key is refused, naming the hub and the file."""
    pki = write_test_pki(tmp_path / "pki", ["alice"])
    encrypted = encrypted_key_copy(pki["alice"].key, tmp_path / "encrypted.key")
    hubs = {
        n: {
            "url": f"https://127.0.0.1:9/{n}",
            "ca": str(pki.ca_cert),
            "cert": str(pki["alice"].cert),
            "key": str(encrypted),
        }
        for n in ("hank", "helen")
    }
    src = build_component(
        DskeSource, {"hubs": hubs}, name="dske", agent="alice", state_dir=tmp_path / "alice"
    )
    try:
        with pytest.raises(Misconfigured, match=r"hub hank: key file .*encrypted\.key is encrypt"):
            await src.prepare()
    finally:
        await src.aclose()
