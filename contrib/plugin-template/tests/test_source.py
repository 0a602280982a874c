"""The source's own rules: untrusted key IDs, an empty pool, the stash and the background task."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from qkdagent import (
    ComponentEvent,
    ConfigError,
    KeyNotFound,
    Link,
    Misconfigured,
    PluginContext,
    SourceError,
    SourceUnavailable,
)
from qkdagent.testing import build_component, running

from qkdagent_example import SharedDirSource

Provision = Callable[..., list[Path]]
"""The `provision` fixture (conftest.py): `provision(count)` -> alice's and bob's key dirs."""

ALICE = Link("ab", "alice", "bob", True)
BOB = Link("ab", "bob", "alice", False)


@pytest.mark.parametrize(
    "key_id", ["../keys-alice/k000000", "/etc/passwd", ".taken-x", "", "k" * 200, "k\x00", "é"]
)
async def test_a_peer_cannot_name_a_file_outside_the_pool(
    provision: Provision, tmp_path: Path, key_id: str
) -> None:
    alice_dir, bob_dir = provision(1)
    bob = build_component(SharedDirSource, {"directory": str(bob_dir)}, state_dir=tmp_path)
    async with running(bob):
        with pytest.raises(KeyNotFound):
            await bob.key_by_id(BOB, key_id)
    assert sorted(p.name for p in alice_dir.iterdir()) == ["k000000"]  # nothing taken


async def test_an_empty_pool_is_unavailable_not_a_crash(
    provision: Provision, tmp_path: Path
) -> None:
    alice_dir, _ = provision(1)
    alice = build_component(
        SharedDirSource, {"directory": str(alice_dir), "low_water": 0}, state_dir=tmp_path
    )
    async with running(alice):
        await alice.new_key(ALICE)
        with pytest.raises(SourceUnavailable, match="no keys left"):
            await alice.new_key(ALICE)


async def test_a_wrong_size_key_file_is_refused_and_gone(
    provision: Provision, tmp_path: Path
) -> None:
    alice_dir, _ = provision(1, size=64)
    alice = build_component(SharedDirSource, {"directory": str(alice_dir)}, state_dir=tmp_path)
    async with running(alice):
        with pytest.raises(SourceError, match="is not 32 bytes"):
            await alice.new_key(ALICE)
    assert list(alice_dir.iterdir()) == []  # single use, even when unusable


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
async def test_a_key_that_is_no_regular_file_is_refused_not_followed(
    provision: Provision, tmp_path: Path, kind: str
) -> None:
    alice_dir, _ = provision(0)
    outside = tmp_path / "outside"
    outside.write_bytes(bytes(range(32)))
    if kind == "symlink":
        (alice_dir / "k000000").symlink_to(outside)
    else:
        os.mkfifo(alice_dir / "k000000")  # opened for reading, it would block forever
    alice = build_component(
        SharedDirSource, {"directory": str(alice_dir), "low_water": 0}, state_dir=tmp_path
    )
    async with running(alice):
        with trio.fail_after(10), pytest.raises(SourceError):
            await alice.new_key(ALICE)
    assert list(alice_dir.iterdir()) == []  # single use, even when unusable
    assert outside.read_bytes() == bytes(range(32))


def test_options_are_checked_when_the_config_is_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^sources\.x\.key_size: "):
        build_component(SharedDirSource, {"directory": str(tmp_path), "key_size": 8})
    with pytest.raises(ConfigError, match=r"^sources\.x\.directory: "):
        build_component(SharedDirSource, {})


async def test_prepare_refuses_a_missing_directory(tmp_path: Path) -> None:
    source = build_component(SharedDirSource, {"directory": str(tmp_path / "none")})
    with pytest.raises(Misconfigured, match="is not a directory"):
        async with running(source):
            pass


async def test_sources_of_one_agent_share_a_lock_through_the_stash(
    provision: Provision, tmp_path: Path
) -> None:
    alice_dir, _ = provision(20)
    table = {"directory": str(alice_dir), "low_water": 0}
    agent = PluginContext("alice", tmp_path)
    first = build_component(SharedDirSource, table, name="a", context=agent)
    second = build_component(SharedDirSource, table, name="b", context=agent)
    other_agent = build_component(SharedDirSource, table, name="c", state_dir=tmp_path)
    assert first._lock is second._lock
    assert other_agent._lock is not first._lock  # one stash per agent, no module globals
    keys: list[str] = []

    async def draw(source: SharedDirSource) -> None:
        for _ in range(5):
            keys.append((await source.new_key(ALICE)).key_id)

    async with running(first, second, other_agent):
        async with trio.open_nursery() as nursery:
            for source in (first, second, other_agent):
                nursery.start_soon(draw, source)
    assert len(keys) == len(set(keys)) == 15


async def test_background_task_reports_a_low_pool_once_per_dip(
    provision: Provision, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    alice_dir, _ = provision(3)
    events: list[ComponentEvent] = []
    context = PluginContext("alice", tmp_path, reporter=events.append)
    table = {"directory": str(alice_dir), "low_water": 2, "check_every": 10}
    source = build_component(SharedDirSource, table, name="pool", context=context)
    async with running(source):  # run() is started here, as the agent starts it
        await trio.sleep(25)
        assert events == []  # 3 keys >= low_water
        await source.new_key(ALICE)
        await source.new_key(ALICE)
        # The count runs in a worker thread, and the autojump clock may move on (any number of
        # virtual seconds) while a thread works: wait for the report with a bound in real time,
        # not in virtual time, which a slow thread lets run out.
        deadline = time.monotonic() + 30
        while not events:
            assert time.monotonic() < deadline, "no low_keys report within 30 s"
            await trio.sleep(1)
        assert [(e.component, e.kind) for e in events] == [("pool", "low_keys")]
        assert "1 keys left" in events[0].detail
        await trio.sleep(50)
        assert len(events) == 1  # not repeated while still low
