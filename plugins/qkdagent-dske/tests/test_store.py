"""Spent PSRD and delivered shares are gone from disk, not only from the tables; a crash never
hands out the same PSRD twice.

"Gone" is checked the way a thief would: every byte of every file under the state directories
(SQLite's file, -wal, -shm, the block files) is searched for the spent bytes. Each search is
paired with one that must succeed (unspent bytes, held pads), so a search that sees nothing
cannot pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qkdagent_dske import wire
from qkdagent_dske.clientstore import ClientPsrd
from qkdagent_dske.hubapp import Hub, HubSettings
from qkdagent_dske.pool import PsrdExhausted
from qkdagent_dske.source import DskeSource
from qkdagent_dske.store import PsrdStore, StoreError

from qkdagent import Link
from qkdagent.testing import build_component, running

from .hubs import hub_table, open_hubs
from .test_hub import Client

ALICE = Link("l", "alice", "bob", True)
BOB = Link("l", "bob", "alice", False)


def disk(*roots: Path) -> bytes:
    """Every file under `roots`, concatenated with separators no needle contains."""
    out = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                out.append((Path(dirpath) / name).read_bytes())
    return b"\0\xff\0".join(out)


def chunks(data: bytes, size: int = 16) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data) - size + 1, size)]


def block_files(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in state.rglob("*-blocks/*")}


async def test_spent_psrd_is_gone_from_every_file_of_clients_and_hubs(tmp_path: Path) -> None:
    names = ["hank", "helen", "hilary"]
    async with open_hubs(tmp_path, names) as (pki, hubs):
        opts = {"k": 2, "refill_every": 3600, "psrd_block_size": 4096}
        sources = [
            build_component(
                DskeSource,
                {"hubs": hub_table(pki, hubs, agent), **opts},
                name="dske",
                agent=agent,
                state_dir=tmp_path / agent,
            )
            for agent in ("alice", "bob")
        ]
        alice, bob = sources
        async with running(alice, bob):
            fresh = {**block_files(tmp_path / "alice"), **block_files(tmp_path / "bob")}
            assert len(fresh) == 12  # 3 hubs x 2 owners x 2 clients
            for _ in range(5):
                key = await alice.new_key(ALICE)
                assert (await bob.key_by_id(BOB, key.key_id)).value == key.value
            spent: list[bytes] = []
            unspent: list[bytes] = []
            for s in sources:
                # batch signing keys allocated but not used yet: the hub still holds them
                reserved = {(f.block_uuid, f.start) for a in s.psrd.reserved() for f in a.fragments}
                for block in s.psrd.book.blocks.values():
                    data = fresh[block.uuid]
                    ranges = [(0, block.next)] if block.owner == "client" else block.used
                    assert ranges and ranges[0][1] >= 64  # this block was used
                    for start, stop in ranges:
                        for at in range(start, stop - 15, 16):
                            if not any((block.uuid, at - d) in reserved for d in range(-15, 32)):
                                spent.append(data[at : at + 16])
                    unspent += chunks(data[ranges[-1][1] :])[:4]
            everything = disk(tmp_path)
            # hubs hold the same PSRD: their copies of the spent ranges are gone too
            assert not [c for c in spent if c in everything]
            assert all(c in everything for c in unspent)
            assert key.value.reveal() not in everything


async def test_a_hub_never_stores_a_share_in_clear_and_zeroes_its_pad_on_delivery(
    tmp_path: Path,
) -> None:
    hub = Hub(HubSettings("hank"), tmp_path / "hank" / "hank.sqlite")
    try:
        carol, conny = Client(hub, "carol"), Client(hub, "conny")
        for c in (carol, conny):
            await c.setup()
        share = os.urandom(32)
        (sig, sig_key), (pad_alloc, pad) = carol.take(32, 32)
        body = wire.SharePost(
            "carol", "carol", "conny", "k1", 1, pad_alloc, wire.xor(share, pad)
        ).encode()
        header = wire.signature_header(sig, sig_key, b"", body)
        assert (
            await carol.call("POST", "/api/v1/key-share", body=body, signature=header)
        ).status == 200
        in_transit = disk(tmp_path)
        assert share not in in_transit and sig_key not in in_transit
        assert pad in in_transit  # held: the share is kept encrypted under it

        hub.close()  # a restart (or a crash: each change is durable before the answer)
        hub = Hub(HubSettings("hank"), tmp_path / "hank" / "hank.sqlite")
        carol.hub = conny.hub = hub
        query, header = conny.get_query("k1")
        reply = await conny.call("GET", "/api/v1/key-share", query, signature=header)
        assert reply.status == 200
        got = wire.parse_share_reply(reply.body)
        (reply_pad,) = conny.book.peek("hank", "hub", [got.encryption_key_allocation])
        assert wire.xor(got.encrypted_share_value, reply_pad) == share
        delivered = disk(tmp_path)
        assert share not in delivered and pad not in delivered and reply_pad not in delivered
        assert not hub.shares
    finally:
        hub.close()


async def test_a_purged_share_takes_its_pad_with_it(tmp_path: Path) -> None:
    hub = Hub(HubSettings("hank", share_ttl=0.0), tmp_path / "hank.sqlite")
    try:
        carol = Client(hub, "carol")
        await carol.setup()
        body, header = carol.post_body("k1", os.urandom(32))
        pad = carol.last_pad
        assert (
            await carol.call("POST", "/api/v1/key-share", body=body, signature=header)
        ).status == 200
        assert pad in disk(tmp_path)
        body, header = carol.post_body("k2", os.urandom(32))  # purges k1 (ttl 0)
        assert (
            await carol.call("POST", "/api/v1/key-share", body=body, signature=header)
        ).status == 200
        assert list(hub.shares) == [("conny", "k2")]
        assert pad not in disk(tmp_path)
    finally:
        hub.close()


async def test_an_allocation_committed_but_never_used_is_never_handed_out_again(
    tmp_path: Path,
) -> None:
    """The crash window: the allocation's transaction committed, the process died before it
    used (and zeroed) the bytes. On restart they are zeroed, and never allocated again."""
    path = tmp_path / "c" / "psrd.sqlite"
    store = PsrdStore(path, "client")
    book = store.load()
    block = os.urandom(4096)
    store.commit([book.add("hank", "client", "6f1f4f5e-9a52-4d7e-8a3b-2f0e1c7d9b10", block)])
    (first,), change = book.allocate("hank", "client", [64])
    store.execute(change.sql)  # committed ... and then the crash: no zeroing, no use
    store.close()
    assert first[1] in disk(path.parent)  # the bytes are still there, spent

    store = PsrdStore(path, "client")
    book = store.load()
    try:
        assert first[1] not in disk(path.parent)  # the scrub zeroed them
        handed = b""
        while True:
            try:
                ((_alloc, data),), change = book.allocate("hank", "client", [64])
            except PsrdExhausted:
                break
            store.commit([change])
            handed += data
        assert len(handed) == 4096 - 64 and first[1] not in handed
        assert handed == block[64:]
        assert not list(store.blocks_dir.iterdir())  # spent block: zeroed, then unlinked
    finally:
        store.close()


async def test_an_orphaned_block_file_is_destroyed_at_open(tmp_path: Path) -> None:
    """A block file whose row never committed (a crash during a refill) is zeroed and removed,
    and its bytes are never used."""
    path = tmp_path / "psrd.sqlite"
    PsrdStore(path, "client").close()
    orphan = path.parent / "psrd-blocks" / "6f1f4f5e-9a52-4d7e-8a3b-2f0e1c7d9b10"
    orphan.write_bytes(os.urandom(256))
    store = PsrdStore(path, "client")
    try:
        assert not store.load().blocks and not orphan.exists()
    finally:
        store.close()


def test_a_block_file_whose_write_fails_leaves_no_psrd_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills mid-write of a refilled block: the half-written file is zeroed and
    removed at once, not left holding PSRD until the next open's scrub."""
    path = tmp_path / "psrd.sqlite"
    store = PsrdStore(path, "client")
    try:
        book = store.load()
        data = os.urandom(4096)
        real_write = os.write

        def half_then_full(fd: int, view: bytes | memoryview) -> int:
            if len(view) < len(data):
                raise OSError(28, "No space left on device")
            return real_write(fd, bytes(view)[: len(data) // 2])

        change = book.add("hank", "hub", "6f1f4f5e-9a52-4d7e-8a3b-2f0e1c7d9b10", data)
        monkeypatch.setattr(os, "write", half_then_full)
        with pytest.raises(OSError, match="No space"):
            store.commit([change])
        monkeypatch.undo()
        assert not list((tmp_path / "psrd-blocks").iterdir())
        assert not [c for c in chunks(data) if c in disk(tmp_path)]
    finally:
        store.close()


async def test_no_bytes_are_handed_out_unless_their_allocation_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    psrd = ClientPsrd(tmp_path / "psrd.sqlite")
    await psrd.open()
    try:
        await psrd.add_block(
            "hank", "client", wire.PsrdBlock("6f1f4f5e-9a52-4d7e-8a3b-2f0e1c7d9b10", bytes(4096))
        )
        assert psrd.store is not None

        def broken(statements: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(psrd.store, "execute", broken)
        with pytest.raises(StoreError, match="No space"):
            await psrd.allocate({"hank": [32, 32]})
        # memory ran ahead of the disk: those bytes are lost, never handed out again
        assert psrd.free("hank", "client") == 4096 - 64
    finally:
        psrd.close()


def test_sqlite_holds_no_psrd(tmp_path: Path) -> None:
    path = tmp_path / "psrd.sqlite"
    store = PsrdStore(path, "client")
    try:
        book = store.load()
        data = os.urandom(4096)
        store.commit([book.add("hank", "hub", "6f1f4f5e-9a52-4d7e-8a3b-2f0e1c7d9b10", data)])
        sqlite_files = b"".join(p.read_bytes() for p in tmp_path.glob("psrd.sqlite*"))
        assert len(sqlite_files) > 4096
        assert not [c for c in chunks(data) if c in sqlite_files]
        assert all(c in disk(tmp_path) for c in chunks(data))
    finally:
        store.close()
