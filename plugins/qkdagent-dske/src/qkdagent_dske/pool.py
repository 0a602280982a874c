"""PSRD pools: blocks of pre-shared random data, allocated once and never reused.

Each side of a client-hub pair keeps two pools per peer (dske-python's pool ownership): the one
it allocates from ("mine": sequential, a pointer per block) and the one its peer allocates from
("theirs": the peer names byte ranges, which are checked against the ranges already used).

`PoolBook` is the pure in-memory view; its methods return the SQL that records a change, and
apply the change only through `apply()` once the caller has committed that SQL. `PsrdDb` is the
SQLite file behind it (WAL, synchronous=FULL: an allocation is on disk before its bytes are
used, so a crash never hands out the same PSRD twice).
"""

from __future__ import annotations

import bisect
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .wire import Allocation, Fragment

Statement = tuple[str, tuple[object, ...]]
_BIG = 1 << 62

SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    peer TEXT NOT NULL,
    owner TEXT NOT NULL CHECK (owner IN ('client', 'hub')),
    data BLOB NOT NULL,
    next INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS used (
    uuid TEXT NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS used_by_block ON used (uuid);
"""


class PsrdError(Exception):
    """An allocation that names unknown, out-of-range or already used PSRD."""


class PsrdExhausted(PsrdError):
    """Not enough PSRD left in the pool: refill it from the hub (out of band)."""


@dataclass(repr=False)
class Block:
    uuid: str
    peer: str
    owner: str
    data: bytes
    next: int = 0
    used: list[tuple[int, int]] = field(default_factory=list)
    """Ranges the peer used (pools the peer allocates from), sorted by start."""

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


@dataclass
class Change:
    """What an operation will change once its SQL is committed."""

    sql: list[Statement] = field(default_factory=list)
    pointers: list[tuple[Block, int]] = field(default_factory=list)
    used: list[tuple[Block, int, int]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    def merge(self, other: Change) -> Change:
        self.sql += other.sql
        self.pointers += other.pointers
        self.used += other.used
        self.blocks += other.blocks
        return self


class PoolBook:
    """Every block this side holds, by peer and owner, in the order they arrived."""

    def __init__(self, blocks: Iterable[Block] = ()) -> None:
        self.blocks: dict[str, Block] = {}
        for block in blocks:
            self.blocks[block.uuid] = block

    def pool(self, peer: str, owner: str) -> list[Block]:
        return [b for b in self.blocks.values() if b.peer == peer and b.owner == owner]

    def free(self, peer: str, owner: str, *, mine: bool) -> int:
        """Bytes left: after the pointer in a pool I allocate from, unused in the peer's."""
        if mine:
            return sum(len(b.data) - b.next for b in self.pool(peer, owner))
        return sum(len(b.data) - sum(e - s for s, e in b.used) for b in self.pool(peer, owner))

    def add(self, peer: str, owner: str, uuid: str, data: bytes) -> Change:
        if uuid in self.blocks:
            raise PsrdError("a PSRD block with that UUID exists already")
        block = Block(uuid, peer, owner, data)
        sql = "INSERT INTO blocks (uuid, peer, owner, data) VALUES (?, ?, ?, ?)"
        return Change(sql=[(sql, (uuid, peer, owner, data))], blocks=[block])

    def allocate(
        self, peer: str, owner: str, sizes: Sequence[int]
    ) -> tuple[list[tuple[Allocation, bytes]], Change]:
        """Sequential allocations from my pool; all or nothing (`PsrdExhausted`)."""
        pool = self.pool(peer, owner)
        pointers = {b.uuid: b.next for b in pool}
        result: list[tuple[Allocation, bytes]] = []
        for size in sizes:
            fragments: list[Fragment] = []
            parts: list[bytes] = []
            want = size
            for block in pool:
                if want == 0:
                    break
                start = pointers[block.uuid]
                take = min(want, len(block.data) - start)
                if take <= 0:
                    continue
                fragments.append(Fragment(block.uuid, start, take))
                parts.append(block.data[start : start + take])
                pointers[block.uuid] = start + take
                want -= take
            if want:
                raise PsrdExhausted(f"PSRD pool ({owner}-owned) with {peer} is exhausted")
            result.append((Allocation(tuple(fragments)), b"".join(parts)))
        change = Change()
        for block in pool:
            if pointers[block.uuid] != block.next:
                change.pointers.append((block, pointers[block.uuid]))
                change.sql.append(
                    (
                        "UPDATE blocks SET next = ? WHERE uuid = ?",
                        (pointers[block.uuid], block.uuid),
                    )
                )
        return result, change

    def peek(self, peer: str, owner: str, allocations: Sequence[Allocation]) -> list[bytes]:
        """The bytes of the peer's allocations, refused if unknown, out of range or used
        (also against each other). Changes nothing: `consume` records them."""
        seen: dict[str, list[tuple[int, int]]] = {}
        out: list[bytes] = []
        for allocation in allocations:
            parts: list[bytes] = []
            for f in allocation.fragments:
                block = self.blocks.get(f.block_uuid)
                if block is None or block.peer != peer or block.owner != owner:
                    raise PsrdError("the allocation names a PSRD block this pool does not hold")
                if f.end > len(block.data):
                    raise PsrdError("the allocation runs past the end of its PSRD block")
                mine = seen.setdefault(block.uuid, [])
                if block.overlaps(f.start, f.end) or any(
                    a < f.end and f.start < b for a, b in mine
                ):
                    raise PsrdError("the allocation reuses PSRD")
                mine.append((f.start, f.end))
                parts.append(block.data[f.start : f.end])
            out.append(b"".join(parts))
        return out

    def consume(self, allocations: Sequence[Allocation]) -> Change:
        change = Change()
        for allocation in allocations:
            for f in allocation.fragments:
                block = self.blocks[f.block_uuid]
                change.used.append((block, f.start, f.end))
                change.sql.append(
                    (
                        "INSERT INTO used (uuid, start, stop) VALUES (?, ?, ?)",
                        (block.uuid, f.start, f.end),
                    )
                )
        return change

    def apply(self, change: Change) -> None:
        for block in change.blocks:
            self.blocks[block.uuid] = block
        for block, pointer in change.pointers:
            block.next = pointer
        for block, start, stop in change.used:
            block.mark(start, stop)


class PsrdDb:
    """The SQLite file behind a `PoolBook` (and, on a hub, its clients and shares)."""

    def __init__(self, path: Path, extra_schema: str = "") -> None:
        # PSRD is one-time-pad material: owner-only directory and file (SQLite gives its -wal
        # and -shm files the database file's mode), also when they already existed.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
        os.chmod(path, 0o600)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # zero deleted rows and freed pages (purged shares, rewritten blocks) instead of leaving
        # used pad bytes in the file's free space
        self.conn.execute("PRAGMA secure_delete = ON")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.executescript(SCHEMA + extra_schema)

    def load(self) -> PoolBook:
        blocks = [
            Block(uuid, peer, owner, bytes(data), nxt)
            for uuid, peer, owner, data, nxt in self.conn.execute(
                "SELECT uuid, peer, owner, data, next FROM blocks ORDER BY seq"
            )
        ]
        book = PoolBook(blocks)
        for uuid, start, stop in self.conn.execute("SELECT uuid, start, stop FROM used"):
            if uuid in book.blocks:
                book.blocks[uuid].mark(start, stop)
        return book

    def commit(self, statements: Sequence[Statement]) -> None:
        """All statements in one durable transaction, or none of them."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return list(self.conn.execute(sql, params))

    def close(self) -> None:
        self.conn.close()


Committer = Callable[[Sequence[Statement]], None]
