"""The durable side of a `PoolBook`: PSRD bytes in block files, bookkeeping in SQLite.

Layout, next to the SQLite file `<x>.sqlite`: a directory `<x>-blocks/` (0700) with one file
per PSRD block (0600, named by the block's UUID) holding its bytes. SQLite (WAL,
synchronous=FULL, secure_delete) holds only metadata: block UUIDs, sizes, allocation pointers,
used ranges (and, on a hub, clients and shares encrypted under held PSRD). No PSRD byte ever
enters SQLite, so none lingers in its journal, WAL or free pages.

A `Change` is made durable in one batch, in this order: new block files written and fsynced
before their rows; the SQL in one transaction (`record`: callers use allocated bytes only once
this returned, so an allocation is on disk before use); the consumed ranges overwritten in place
with zeros and fdatasync'd, spent blocks zeroed whole and unlinked (`wipe`, before the next
batch starts). A crash between the
transaction and the zeroing leaves spent bytes in a block file, never reusable (the pointer and
used ranges are committed); `load` zeroes them on the next start (the scrub), as it does
orphaned files of blocks whose row never committed.

Concurrent callers share batches (group commit): one transaction and one fdatasync per touched
file for all changes that queued while the previous batch was on disk.
"""

from __future__ import annotations

import bisect
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import wire
from .pool import Block, Change, PoolBook, PsrdError, Statement

SCHEMA = """
CREATE TABLE IF NOT EXISTS psrd_blocks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    peer TEXT NOT NULL,
    owner TEXT NOT NULL CHECK (owner IN ('client', 'hub')),
    size INTEGER NOT NULL,
    next INTEGER NOT NULL DEFAULT 0,
    retired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS psrd_used (
    uuid TEXT NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS psrd_used_by_block ON psrd_used (uuid);
"""

_ZEROS = bytes(1 << 16)

log = logging.getLogger("qkdagent.dske.store")


class StoreError(Exception):
    """The PSRD store could not make a change durable (disk full, I/O error)."""


@dataclass
class _Pending:
    change: Change
    wake: trio.Event = field(default_factory=trio.Event)
    finished: bool = False
    error: BaseException | None = None


def _zero(fd: int, start: int, stop: int) -> None:
    while start < stop:
        n = os.pwrite(fd, _ZEROS[: min(len(_ZEROS), stop - start)], start)
        start += n


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` minus `holes` (both sorted lists of half-open intervals)."""
    out = []
    for start, stop in ranges:
        i = bisect.bisect_left(holes, (start, start))
        i = max(0, i - 1)
        pos = start
        for h_start, h_stop in holes[i:]:
            if h_start >= stop:
                break
            if h_stop <= pos:
                continue
            if h_start > pos:
                out.append((pos, h_start))
            pos = max(pos, h_stop)
        if pos < stop:
            out.append((pos, stop))
    return out


class PsrdStore:
    """One side's PSRD files and SQLite bookkeeping; `mine` is the owner this side allocates
    from ("client" on a client, "hub" on a hub)."""

    def __init__(self, path: Path, mine: str, extra_schema: str = "") -> None:
        # PSRD is one-time-pad material: owner-only directories and files (SQLite gives its
        # -wal and -shm files the database file's mode), also when they already existed.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        self.path = path
        self.mine = mine
        self.blocks_dir = path.parent / f"{path.stem}-blocks"
        self.blocks_dir.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.blocks_dir, 0o700)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
        os.chmod(path, 0o600)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA secure_delete = ON")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        old = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'blocks'"
        ).fetchall()
        if old:
            self.conn.close()
            raise StoreError(
                f"{path} holds PSRD in an older layout (bytes inside SQLite): move it away"
            )
        self.conn.executescript(SCHEMA + extra_schema)
        self._fds: dict[str, int] = {}
        self._queue: list[_Pending] = []
        self._busy = False

    def __repr__(self) -> str:
        return f"<PsrdStore {self.path}>"

    # -- files --------------------------------------------------------------------------------

    def _file(self, uuid: str) -> Path:
        return self.blocks_dir / wire.canonical_uuid(uuid)

    def _fd(self, uuid: str) -> int:
        fd = self._fds.get(uuid)
        if fd is None:
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = self._fds[uuid] = os.open(self._file(uuid), flags)
        return fd

    def _sync_dir(self) -> None:
        fd = os.open(self.blocks_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_block(self, uuid: str, data: bytes) -> None:
        final = self._file(uuid)
        tmp = final.with_name(final.name + ".new")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)

    def _destroy(self, path: Path) -> None:
        """Zero a whole block file on disk, then unlink it (unlinking alone frees the disk
        blocks with the bytes still in them)."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            _zero(fd, 0, os.fstat(fd).st_size)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        path.unlink()

    # -- batches ------------------------------------------------------------------------------

    def commit(self, changes: Sequence[Change]) -> None:
        """Make `changes` durable, in the order the module docstring gives (blocking)."""
        self.record(changes)
        self.wipe(changes)

    def record(self, changes: Sequence[Change]) -> None:
        """New block files, then the SQL: what must be on disk before bytes are used."""
        files = [f for c in changes for f in c.files]
        for uuid, data in files:
            self._write_block(uuid, data)
        if files:
            self._sync_dir()
        self.execute([s for c in changes for s in c.sql])

    def wipe(self, changes: Sequence[Change]) -> None:
        """Zero what `changes` spent, in place, and destroy spent blocks."""
        touched: set[int] = set()
        for change in changes:
            for uuid, start, stop in change.wipe:
                fd = self._fd(uuid)
                _zero(fd, start, stop)
                touched.add(fd)
        for fd in touched:
            os.fdatasync(fd)
        retire = [u for c in changes for u in c.retire]
        for uuid in retire:
            if uuid in self._fds:
                os.close(self._fds.pop(uuid))
            self._destroy(self._file(uuid))
        if retire:
            self._sync_dir()

    def execute(self, statements: Sequence[Statement]) -> None:
        """All statements in one durable transaction, or none of them."""
        if not statements:
            return
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def durable(self, change: Change) -> None:
        """Return once `change` is recorded on disk (`record`); its spent bytes are zeroed
        (`wipe`) right after, before the next batch, while the callers go on. Changes queued
        while a batch is being written go together in the next one (group commit). Shielded:
        the in-memory view has changed already, so the disk must follow even if the caller is
        cancelled."""
        if not change:
            return
        entry = _Pending(change)
        self._queue.append(entry)
        with trio.CancelScope(shield=True):
            if self._busy:
                await entry.wake.wait()  # done, or woken to lead the next batch
            if not entry.finished:
                self._busy = True
                batch, self._queue = self._queue, []
                changes = [e.change for e in batch]
                try:
                    await trio.to_thread.run_sync(self.record, changes)
                except (OSError, sqlite3.Error) as exc:
                    for e in batch:
                        e.error = exc
                for e in batch:
                    e.finished = True
                    e.wake.set()
                if batch[0].error is None:
                    try:
                        await trio.to_thread.run_sync(self.wipe, changes)
                    except OSError as exc:  # the scrub at the next open zeroes them
                        log.error("PSRD store %s: zeroing spent PSRD failed: %s", self.path, exc)
                if self._queue:
                    self._queue[0].wake.set()
                else:
                    self._busy = False
        if entry.error is not None:
            raise StoreError(f"PSRD store {self.path}: {entry.error}") from None

    # -- loading ------------------------------------------------------------------------------

    def load(self, held: Iterable[wire.Allocation] = ()) -> PoolBook:
        """The pools as committed, after the scrub: spent bytes still in block files (a crash
        before their zeroing) are zeroed, orphaned and retired block files destroyed. `held`
        are used ranges whose bytes must stay (a hub's shares in transit)."""
        keep: dict[str, list[tuple[int, int]]] = {}
        for allocation in held:
            for f in allocation.fragments:
                keep.setdefault(f.block_uuid, []).append((f.start, f.end))
        used: dict[str, list[tuple[int, int]]] = {}
        for uuid, start, stop in self.conn.execute("SELECT uuid, start, stop FROM psrd_used"):
            used.setdefault(uuid, []).append((start, stop))
        blocks: list[Block] = []
        rows = self.conn.execute(
            "SELECT uuid, peer, owner, size, next, retired FROM psrd_blocks ORDER BY seq"
        ).fetchall()
        known = set()
        for uuid, peer, owner, size, nxt, retired in rows:
            known.add(uuid)
            block = Block(uuid, peer, owner, size, bytearray(), nxt, retired=bool(retired))
            for start, stop in used.get(uuid, []):
                block.mark(start, stop)
            path = self._file(uuid)
            if block.retired or not path.exists():
                block.retired = True
                if path.exists():
                    self._destroy(path)
                blocks.append(block)
                continue
            with open(path, "rb") as file:
                block.data = bytearray(file.read(size + 1))
            if len(block.data) != size:
                raise StoreError(f"PSRD block file {path.name} has the wrong size")
            if owner == self.mine:
                spent = [(0, nxt)] if nxt else []
            else:
                holes = sorted(keep.get(uuid, []))
                spent = _subtract(block.used, holes)
                block.held = len(holes)
            fd = None
            for start, stop in spent:
                if any(block.data[start:stop]):
                    block.data[start:stop] = bytes(stop - start)
                    fd = self._fd(uuid)
                    _zero(fd, start, stop)
            if fd is not None:
                os.fdatasync(fd)
            blocks.append(block)
        for path in self.blocks_dir.iterdir():
            if path.name not in known:  # a block whose row never committed, or a temp file
                self._destroy(path)
        return PoolBook(blocks)

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return list(self.conn.execute(sql, params))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.conn.close()


__all__ = ["PsrdError", "PsrdStore", "StoreError"]
