"""The durable pool: key survives a restart, is handed out once, is destroyed on disk when used,
and a crash at any step loses at most a block, never hands a piece out twice."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from qkdagent import KeyNotFound, Link, Misconfigured, SourceUnavailable
from qkdagent.testing import build_component, running

from qkdagent_bb84 import Bb84Source
from qkdagent_bb84.engine import Settings
from qkdagent_bb84.physics import Physics
from qkdagent_bb84.pool import Bb84Link
from qkdagent_bb84.store import KeyStore

ALICE = Link("ab", "alice", "bob", True)
BOB = Link("ab", "bob", "alice", False)
FAST = {"decoys": False, "block_bits": 4_000, "low_water": 0, "seed": 5}
SETTINGS = Settings(physics=Physics(decoys=False), block_bits=4_000)
_names = itertools.count()


@pytest.fixture
def link_name() -> Iterator[str]:
    name = f"store-{next(_names)}"
    yield name
    Bb84Link.forget(name)


def disk_bytes(directory: Path) -> bytes:
    """Everything stored under `directory` (every file's bytes, concatenated)."""
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def pair(tmp_path: Path, link_name: str, **extra: object) -> tuple[Bb84Source, Bb84Source]:
    table = {**FAST, "link": link_name, **extra}
    return (
        build_component(Bb84Source, table, links=(ALICE,), state_dir=tmp_path / "a"),
        build_component(Bb84Source, table, links=(BOB,), state_dir=tmp_path / "b"),
    )


def linked(tmp_path: Path, seed: int = 3) -> tuple[Bb84Link, KeyStore, KeyStore]:
    link = Bb84Link("direct", SETTINGS, 32, seed)
    alice, bob = KeyStore(tmp_path / "a"), KeyStore(tmp_path / "b")
    link.attach("a", alice, alice=True)
    link.attach("b", bob, alice=False)
    return link, alice, bob


async def test_unused_key_survives_a_restart_and_used_key_does_not(
    tmp_path: Path, link_name: str
) -> None:
    alice, bob = pair(tmp_path, link_name)
    async with running(alice, bob):
        used = await alice.new_key(ALICE)
        assert (await bob.key_by_id(BOB, used.key_id)).value == used.value
        assert alice.store is not None
        left = alice.store.level()
        assert left > 0
    Bb84Link.forget(link_name)  # the process restarts: a new simulated link, same state dirs

    alice, bob = pair(tmp_path, link_name)
    async with running(alice, bob):
        assert alice.store is not None and alice.store.level() == left
        seen = []
        for _ in range(left):  # every piece established before the restart, each once
            key = await alice.new_key(ALICE)
            assert (await bob.key_by_id(BOB, key.key_id)).value == key.value
            seen.append(key)
        assert len({k.key_id for k in seen}) == left and used.key_id not in {k.key_id for k in seen}
        assert used.value.reveal() not in {k.value.reveal() for k in seen}
        with pytest.raises(KeyNotFound):
            await bob.key_by_id(BOB, used.key_id)
        assert alice.store.level() == 0
        fresh = await alice.new_key(ALICE)  # dry: a new block, under the new run's IDs
        assert fresh.key_id.split("-")[0] != used.key_id.split("-")[0]


def test_used_pieces_are_zeroed_on_disk_and_spent_files_removed(tmp_path: Path) -> None:
    link, alice, bob = linked(tmp_path)
    assert link.produce().ok
    pieces = alice.level()
    assert pieces >= 2 and bob.level() == pieces
    key_id, value = alice.take_oldest()  # type: ignore[misc]
    other_id, other = alice.take_oldest()  # type: ignore[misc]
    assert bob.take(key_id) == value
    # the taken pieces are gone from every file at both ends; an untaken one is still there
    assert value not in disk_bytes(tmp_path / "a") and value not in disk_bytes(tmp_path / "b")
    assert other not in disk_bytes(tmp_path / "a") and other in disk_bytes(tmp_path / "b")
    while alice.take_oldest() is not None:
        pass
    assert not list((tmp_path / "a").glob("*.key"))  # all used: file zeroed and unlinked
    assert list((tmp_path / "b").glob("*.key"))  # bob still holds the pieces never asked for
    assert bob.take(other_id) == other and bob.take(other_id) is None


def test_a_crash_mid_block_loses_the_block(tmp_path: Path) -> None:
    link, alice, bob = linked(tmp_path)
    assert link.produce().ok
    before = alice.level()
    # the next block is staged at both ends, then the process dies before publishing it
    for store in (alice, bob):
        store.reserve(7)
        store.stage("0123abcd-7", os.urandom(512), 32)
    assert list((tmp_path / "a").glob("*.new"))

    alice2, bob2 = KeyStore(tmp_path / "a"), KeyStore(tmp_path / "b")  # restart
    assert not list(tmp_path.rglob("*.new"))  # scrubbed
    assert alice2.level() == before and bob2.take("0123abcd-7-0") is None
    assert alice2.next_block == 8  # the cut-off block's number is never run again


def test_a_block_whose_write_fails_leaves_no_key_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills mid-write: the half-written staged file is zeroed and removed at once,
    not left holding key until the next open's scrub."""
    store = KeyStore(tmp_path / "a")
    key = os.urandom(4096)
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        if len(data) < len(key):
            raise OSError(28, "No space left on device")
        return real_write(fd, bytes(data)[: len(key) // 2])

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        store.stage("0123abcd-7", key, 32)
    monkeypatch.undo()
    assert not list((tmp_path / "a").glob("*.new")) and not store.holds("0123abcd-7")
    assert key[:64] not in disk_bytes(tmp_path / "a")


def test_a_crash_between_the_two_ends_publishing_leaves_no_id_alice_can_hand_out(
    tmp_path: Path,
) -> None:
    _, alice, bob = linked(tmp_path)
    for store in (alice, bob):
        store.stage("0123abcd-0", bytes(range(1, 65)), 32)
    bob.publish("0123abcd-0")  # responder first, then the crash
    alice2, bob2 = KeyStore(tmp_path / "a"), KeyStore(tmp_path / "b")
    assert alice2.take_oldest() is None and bob2.level() == 2


def test_a_piece_taken_before_a_crash_is_never_handed_out_again(tmp_path: Path) -> None:
    link, alice, _ = linked(tmp_path)
    assert link.produce().ok and link.produce().ok
    taken = dict(alice.take_oldest() for _ in range(5))  # type: ignore[misc]
    # crash: no close, no cleanup; a new process opens the same directory
    reopened = KeyStore(tmp_path / "a")
    assert reopened.level() == alice.level()
    rest = []
    while (piece := reopened.take_oldest()) is not None:
        rest.append(piece)
    assert not set(taken) & {i for i, _ in rest}
    assert not set(taken.values()) & {v for _, v in rest}


def test_a_seeded_link_never_runs_a_block_number_twice(tmp_path: Path) -> None:
    link, alice, _ = linked(tmp_path, seed=11)
    assert link.produce().ok
    first = [alice.take_oldest()[1] for _ in range(3)]  # type: ignore[index]
    link2, alice2, _ = linked(tmp_path, seed=11)  # restart with the same seed
    assert link2._next_block == 1
    assert link2.produce().ok
    again = []
    while (piece := alice2.take_oldest()) is not None:
        again.append(piece[1])
    assert again and not set(first) & set(again)


@pytest.mark.parametrize("key_id", ["../x", "0123abcd-0-99999", "0123abcd-0-0\n", "", "a" * 300])
def test_bad_or_unknown_ids_touch_nothing(tmp_path: Path, key_id: str) -> None:
    link, _, bob = linked(tmp_path)
    assert link.produce().ok
    level = bob.level()
    assert bob.take(key_id) is None and bob.level() == level


async def test_an_unreadable_pool_is_misconfigured(tmp_path: Path, link_name: str) -> None:
    alice, _ = pair(tmp_path, link_name)
    async with running(alice):
        assert alice.store is not None
        (alice.store.directory / "next-block").write_bytes(b"lots")
    Bb84Link.forget(link_name)
    again, _ = pair(tmp_path, link_name)
    with pytest.raises(Misconfigured, match="next-block is not a number"):
        async with running(again):
            pass


async def test_no_block_runs_without_the_other_end(tmp_path: Path, link_name: str) -> None:
    alice, _ = pair(tmp_path, link_name)
    async with running(alice):
        with pytest.raises(SourceUnavailable, match="other end"):
            await alice.new_key(ALICE)
    assert Bb84Link._registry[link_name].stats.blocks == 0
