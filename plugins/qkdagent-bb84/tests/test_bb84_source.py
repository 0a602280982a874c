"""The `bb84` source: contract, untrusted key IDs, aborts, and two agents rotating through it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from qkdagent import (
    ComponentEvent,
    KeyNotFound,
    Link,
    Misconfigured,
    PluginContext,
    SourceUnavailable,
)
from qkdagent.testing import SourceContract, build_component, open_agent_pair, running

from qkdagent_bb84 import Bb84Source
from qkdagent_bb84.engine import Settings
from qkdagent_bb84.pool import Bb84Link

ALICE = Link("ab", "alice", "bob", True)
BOB = Link("ab", "bob", "alice", False)
_names = itertools.count()

ROTATIONS = 100
FAST = {"decoys": False, "block_bits": 4_000, "low_water": 0, "seed": 5}
"""Small blocks without decoys (Tomamichel et al. 2012 length): a block takes milliseconds."""


def agents(table: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Both agents' config (the bb84 source `table`, a recording sink) and a fast link."""
    sides = {
        name: {
            "plugins": ["bb84", "memory"],
            "sources": {"qkd": dict(table)},
            "sinks": {"rec": {"type": "recording"}},
        }
        for name in ("alice", "bob")
    }
    return sides, {"interval": 1, "reject_after": 30, "jitter": 0}


@pytest.fixture
def link_name() -> Iterator[str]:
    name = f"test-{next(_names)}"
    yield name
    Bb84Link.forget(name)


class TestBb84Source(SourceContract):
    source_class = Bb84Source

    @pytest.fixture
    def source_options(self, link_name: str) -> dict[str, Any]:
        return {**FAST, "link": link_name}


def ends(table: dict[str, Any], tmp_path: Path, **kw: Any) -> tuple[Bb84Source, Bb84Source]:
    """alice's (initiator) and bob's sources of one link, each with its own state directory."""
    return (
        build_component(Bb84Source, table, links=(ALICE,), state_dir=tmp_path / "a", **kw),
        build_component(Bb84Source, table, links=(BOB,), state_dir=tmp_path / "b", **kw),
    )


async def test_peer_key_ids_are_checked_before_lookup(link_name: str, tmp_path: Path) -> None:
    alice, bob = ends({**FAST, "link": link_name}, tmp_path)
    async with running(alice, bob):
        key = await alice.new_key(ALICE)
        for bad in ("../x", "", "0" * 300, key.key_id + "x", "zzzzzzzz-1-1"):
            with pytest.raises(KeyNotFound):
                await bob.key_by_id(BOB, bad)
        assert (await bob.key_by_id(BOB, key.key_id)).value == key.value


async def test_an_eavesdropped_link_gives_no_key_and_reports_aborts(
    link_name: str, tmp_path: Path
) -> None:
    events: list[ComponentEvent] = []
    context = PluginContext("alice", tmp_path / "a", reporter=events.append)
    table = {**FAST, "link": link_name, "eve_intercept": 1.0}
    alice = build_component(Bb84Source, table, name="qkd", context=context, links=(ALICE,))
    bob = build_component(Bb84Source, table, name="qkd", state_dir=tmp_path / "b")
    async with running(alice, bob):
        with pytest.raises(SourceUnavailable, match="qber above threshold"):
            await alice.new_key(ALICE)
    assert events and all(e.kind == "block_aborted" for e in events)
    assert Bb84Link._registry[link_name].stats.key_bits == 0


async def test_both_ends_must_simulate_the_same_link(link_name: str, tmp_path: Path) -> None:
    alice = build_component(Bb84Source, {**FAST, "link": link_name}, state_dir=tmp_path / "a")
    bob = build_component(
        Bb84Source, {**FAST, "link": link_name, "distance_km": 80}, state_dir=tmp_path / "b"
    )
    with pytest.raises(Misconfigured, match="configured differently"):
        async with running(alice, bob):
            pass


async def test_background_task_fills_the_pool(link_name: str, tmp_path: Path) -> None:
    table = {**FAST, "link": link_name, "low_water": 20, "check_every": 0.01}
    alice, bob = ends(table, tmp_path)
    async with running(alice, bob):
        assert alice.store is not None and bob.store is not None
        with trio.fail_after(30):
            while alice.store.level() < 20:  # noqa: ASYNC110 - waiting on a worker thread
                await trio.sleep(0.01)
        sim = Bb84Link._registry[link_name]
        assert sim.stats.blocks >= 1 and bob.store.level() >= 20


async def test_two_agents_rotate_100_times_through_bb84(
    link_name: str, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Under the virtual clock (in-process agents, blocks on the event loop): 100 epochs, each
    secret the same at both ends, from 100 different key IDs."""
    table = {"type": "bb84", **FAST, "link": link_name, "low_water": 4, "worker_thread": False}
    sides, link = agents(table)
    async with open_agent_pair(tmp_path / "pair", link=link, local=True, **sides) as pair:
        await pair.wait_for_epoch(ROTATIONS, timeout=ROTATIONS * 10)
        await pair.wait_for_installs(ROTATIONS, "rec")
        installs = {
            name: {r.epoch: r for r in pair.sink(name, "rec").installs} for name in ("alice", "bob")
        }
        shown = {name: exposed(pair.agents[name].metrics.exposition()) for name in ("alice", "bob")}
    # the agents' /metrics: both pools' levels; the blocks, QBER and rate of whichever end ran them
    for name in ("alice", "bob"):
        assert shown[name]['qkdagent_bb84_pool_bits{source="qkd"}'] >= 0
    counted = (
        s.get(f'qkdagent_bb84_{kind}_total{{source="qkd"}}', 0)
        for s in shown.values()
        for kind in ("blocks", "blocks_aborted")
    )
    assert sum(counted) == Bb84Link._registry[link_name].stats.blocks > 0
    ran = next(s for s in shown.values() if 'qkdagent_bb84_blocks_total{source="qkd"}' in s)
    assert 0 < ran['qkdagent_bb84_qber{source="qkd"}'] < 0.05
    assert ran['qkdagent_bb84_key_rate_bits_per_second{source="qkd"}'] > 0
    assert 0 < ran['qkdagent_bb84_key_bits_per_pulse{source="qkd"}'] < 1
    epochs = range(1, ROTATIONS + 1)
    for epoch in epochs:
        a, b = installs["alice"][epoch], installs["bob"][epoch]
        assert a.fingerprint == b.fingerprint and a.key_ids == b.key_ids, epoch
    assert len({installs["alice"][e].fingerprint for e in epochs}) == ROTATIONS
    assert len({installs["alice"][e].key_ids for e in epochs}) == ROTATIONS
    assert Bb84Link._registry[link_name].stats.key_bits >= ROTATIONS * 256


async def test_two_agents_rotate_over_https_with_blocks_in_worker_threads(
    link_name: str, tmp_path: Path
) -> None:
    table = {"type": "bb84", **FAST, "link": link_name, "low_water": 4}
    sides, link = agents(table)
    async with open_agent_pair(tmp_path / "pair", link=link, **sides) as pair:
        await pair.wait_for_epoch(2)
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")


def exposed(text: bytes) -> dict[str, float]:
    """Sample name with labels -> value, from a Prometheus text exposition."""
    samples = (line.rsplit(" ", 1) for line in text.decode().splitlines() if line[:1] != "#")
    return {name: float(value) for name, value in samples}


def test_link_repr_hides_the_seed() -> None:
    """The simulation seed fixes every bit, so every key: no repr may show it."""
    shown = repr(Bb84Link("repr-link", Settings(), 32, 987654321987))
    assert "repr-link" in shown
    assert "987654321987" not in shown and "seed" not in shown


async def test_agents_restarted_take_up_the_pool_they_left(
    link_name: str, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Both agents stop (the process dies: a new simulated link), then start again with the same
    state directories: the next epochs use keys established before, never one used before."""
    table = {"type": "bb84", **FAST, "link": link_name, "low_water": 40, "worker_thread": False}
    sides, link = agents(table)
    async with open_agent_pair(tmp_path / "pair", link=link, local=True, **sides) as pair:
        await pair.wait_for_epoch(3, timeout=100)
        before = {i for r in pair.sink("alice", "rec").installs for i in r.key_ids}
        first_run = Bb84Link._registry[link_name].run_id
        await pair.stop("alice")
        await pair.stop("bob")
        Bb84Link.forget(link_name)
        await pair.start("bob")
        await pair.start("alice")
        epoch = pair.epoch("alice")
        await pair.wait_for_epoch(epoch + 3, timeout=100)
        installs = pair.sink("alice", "rec").installs  # the committed epoch is installed again
        after = [i for r in installs if r.epoch > epoch for i in r.key_ids]
        assert pair.secret("alice", "rec") == pair.secret("bob", "rec")
    assert Bb84Link._registry[link_name].run_id != first_run
    assert after and not set(after) & before
    assert after[0].startswith(first_run)  # left in the pool before the restart
