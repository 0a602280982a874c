"""PSRD pools: blocks of pre-shared random data, allocated once and never reused (pure).

Each side of a client-hub pair keeps two pools per peer (dske-python's pool ownership): the one
it allocates from ("mine": sequential, a pointer per block) and the one its peer allocates from
("theirs": the peer names byte ranges, which are checked against the ranges already used).

`PoolBook` is the in-memory view and changes at once (so concurrent callers never get the same
bytes); each change returns a `Change`: the SQL that records it, the block ranges to overwrite
with zeros on disk, the block files to write or delete. `store.PsrdStore` makes a `Change`
durable, and callers use allocated bytes only once it is. Memory may run ahead of the disk,
never behind: a crash in between wastes PSRD, it never hands the same PSRD out twice.

Consumed bytes are zeroed in memory here and on disk by the store. One exception: a hub holds
the pad of a share in transit (`consume(..., hold=True)`) until the share is delivered or
purged (`release`), because it keeps the share encrypted under that pad instead of in clear.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .wire import Allocation, Fragment

Statement = tuple[str, tuple[object, ...]]
_BIG = 1 << 62


class PsrdError(Exception):
    """An allocation that names unknown, out-of-range or already used PSRD."""


class PsrdExhausted(PsrdError):
    """Not enough PSRD left in the pool: refill it from the hub (out of band)."""


@dataclass(repr=False)
class Block:
    uuid: str
    peer: str
    owner: str
    size: int
    data: bytearray
    """The block's bytes, consumed ranges zeroed; empty once the block is retired."""
    next: int = 0
    """Pools I allocate from: bytes below `next` are spent."""
    used: list[tuple[int, int]] = field(default_factory=list)
    """Pools the peer allocates from: ranges it used, sorted and merged."""
    held: int = 0
    """Used ranges whose bytes are still kept (pads of shares in transit on a hub)."""
    retired: bool = False

    def __repr__(self) -> str:  # PSRD is key material: never shown
        return f"<Block {self.uuid} {self.owner}-owned with {self.peer}>"

    def overlaps(self, start: int, stop: int) -> bool:
        i = bisect.bisect_right(self.used, (start, _BIG))
        if i and self.used[i - 1][1] > start:
            return True
        return i < len(self.used) and self.used[i][0] < stop

    def mark(self, start: int, stop: int) -> None:
        """Record a used range, merged with touching neighbours (pools are used in order, so
        the list stays short)."""
        used = self.used
        i = bisect.bisect_left(used, (start, start))
        if i and used[i - 1][1] >= start:
            i -= 1
            start = used[i][0]
            stop = max(stop, used[i][1])
            del used[i]
        while i < len(used) and used[i][0] <= stop:
            stop = max(stop, used[i][1])
            del used[i]
        used.insert(i, (start, stop))

    def spent(self, mine: bool) -> bool:
        if mine:
            return self.next >= self.size
        return self.used == [(0, self.size)] and not self.held


@dataclass
class Change:
    """What makes an in-memory change durable, in this order: write `files` (new blocks),
    commit `sql`, overwrite `wipe` ranges with zeros, delete the `retire` files."""

    sql: list[Statement] = field(default_factory=list)
    files: list[tuple[str, bytes]] = field(default_factory=list, repr=False)
    wipe: list[tuple[str, int, int]] = field(default_factory=list)
    retire: list[str] = field(default_factory=list)

    def merge(self, other: Change) -> Change:
        self.sql += other.sql
        self.files += other.files
        self.wipe += other.wipe
        self.retire += other.retire
        return self

    def __bool__(self) -> bool:
        return bool(self.sql or self.files or self.wipe or self.retire)


class PoolBook:
    """Every block this side holds, by peer and owner, in the order they arrived."""

    def __init__(self, blocks: Iterable[Block] = ()) -> None:
        self.blocks: dict[str, Block] = {}
        self._pools: dict[tuple[str, str], list[Block]] = {}
        for block in blocks:
            self._insert(block)

    def _insert(self, block: Block) -> None:
        self.blocks[block.uuid] = block
        self._pools.setdefault((block.peer, block.owner), []).append(block)

    def pool(self, peer: str, owner: str) -> list[Block]:
        return self._pools.get((peer, owner), [])

    def free(self, peer: str, owner: str, *, mine: bool) -> int:
        """Bytes left: after the pointer in a pool I allocate from, unused in the peer's."""
        if mine:
            return sum(b.size - b.next for b in self.pool(peer, owner))
        return sum(b.size - sum(e - s for s, e in b.used) for b in self.pool(peer, owner))

    def add(self, peer: str, owner: str, uuid: str, data: bytes) -> Change:
        if uuid in self.blocks:
            raise PsrdError("a PSRD block with that UUID exists already")
        self._insert(Block(uuid, peer, owner, len(data), bytearray(data)))
        sql = "INSERT INTO psrd_blocks (uuid, peer, owner, size) VALUES (?, ?, ?, ?)"
        return Change(sql=[(sql, (uuid, peer, owner, len(data)))], files=[(uuid, data)])

    def _retire(self, block: Block, change: Change, *, mine: bool) -> None:
        if not block.retired and block.spent(mine):
            block.retired = True
            block.data = bytearray()
            change.sql.append(("UPDATE psrd_blocks SET retired = 1 WHERE uuid = ?", (block.uuid,)))
            change.retire.append(block.uuid)

    def allocate(
        self, peer: str, owner: str, sizes: Sequence[int]
    ) -> tuple[list[tuple[Allocation, bytes]], Change]:
        """Sequential allocations from my pool, all or nothing (`PsrdExhausted`); the bytes
        are zeroed in memory at once and on disk by the store."""
        pool = [b for b in self.pool(peer, owner) if b.next < b.size]
        need = sum(sizes)
        if need > sum(b.size - b.next for b in pool):
            raise PsrdExhausted(f"PSRD pool ({owner}-owned) with {peer} is exhausted")
        if not need:
            return [], Change()
        result: list[tuple[Allocation, bytes]] = []
        change = Change()
        blocks = iter(pool)
        block = next(blocks)
        for size in sizes:
            fragments: list[Fragment] = []
            parts: list[bytes] = []
            want = size
            while want:
                if block.next == block.size:
                    block = next(blocks)
                start = block.next
                take = min(want, block.size - start)
                fragments.append(Fragment(block.uuid, start, take))
                parts.append(bytes(block.data[start : start + take]))
                block.data[start : start + take] = bytes(take)
                block.next = start + take
                change.wipe.append((block.uuid, start, start + take))
                want -= take
            result.append((Allocation(tuple(fragments)), b"".join(parts)))
        touched = {u for u, _, _ in change.wipe}
        for b in pool:
            if b.uuid in touched:
                sql = "UPDATE psrd_blocks SET next = ? WHERE uuid = ?"
                change.sql.append((sql, (b.next, b.uuid)))
                self._retire(b, change, mine=True)
        return result, change

    def peek(self, peer: str, owner: str, allocations: Sequence[Allocation]) -> list[bytes]:
        """The bytes of the peer's allocations, refused if unknown, out of range or used
        (also against each other). Changes nothing: `consume` records them."""
        ranges: list[tuple[str, int, int]] = []
        out: list[bytes] = []
        for allocation in allocations:
            parts: list[bytes] = []
            for f in allocation.fragments:
                block = self.blocks.get(f.block_uuid)
                if block is None or block.peer != peer or block.owner != owner:
                    raise PsrdError("the allocation names a PSRD block this pool does not hold")
                if f.end > block.size:
                    raise PsrdError("the allocation runs past the end of its PSRD block")
                if block.overlaps(f.start, f.end):
                    raise PsrdError("the allocation reuses PSRD")
                ranges.append((block.uuid, f.start, f.end))
                parts.append(bytes(block.data[f.start : f.end]))
            out.append(b"".join(parts))
        # against each other: sorted, each range must start after every earlier one's end
        ranges.sort()
        last, reach = "", 0
        for uuid, start, stop in ranges:
            if uuid == last and start < reach:
                raise PsrdError("the allocation reuses PSRD")
            if uuid != last:
                last, reach = uuid, stop
            else:
                reach = max(reach, stop)
        return out

    def consume(self, allocations: Sequence[Allocation], *, hold: bool = False) -> Change:
        """Record the peer's allocations (already checked by `peek`) as used and zero their
        bytes, unless `hold`: then they are kept until `release`."""
        change = Change()
        for allocation in allocations:
            for f in allocation.fragments:
                block = self.blocks[f.block_uuid]
                block.mark(f.start, f.end)
                change.sql.append(
                    (
                        "INSERT INTO psrd_used (uuid, start, stop) VALUES (?, ?, ?)",
                        (block.uuid, f.start, f.end),
                    )
                )
                if hold:
                    block.held += 1
                else:
                    block.data[f.start : f.end] = bytes(f.size)
                    change.wipe.append((block.uuid, f.start, f.end))
                    self._retire(block, change, mine=False)
        return change

    def release(self, allocation: Allocation) -> tuple[bytes, Change]:
        """The bytes of a held allocation, now zeroed (the share they encrypt is gone)."""
        change = Change()
        parts: list[bytes] = []
        for f in allocation.fragments:
            block = self.blocks[f.block_uuid]
            parts.append(bytes(block.data[f.start : f.end]))
            block.data[f.start : f.end] = bytes(f.size)
            block.held -= 1
            change.wipe.append((block.uuid, f.start, f.end))
            self._retire(block, change, mine=False)
        return b"".join(parts), change
