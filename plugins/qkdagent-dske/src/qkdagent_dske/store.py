"""The durable side of a `PoolBook`: PSRD bytes in block files, bookkeeping in SQLite.

Layout, next to the SQLite file `<x>.sqlite`: a directory `<x>-blocks/` (0700) with one file
per PSRD block (0600, named by the block's UUID) holding its bytes. SQLite (WAL,
synchronous=FULL, secure_delete) holds only metadata: block UUIDs, sizes, allocation pointers,
used ranges (and, on a hub, clients and shares encrypted under held PSRD). No PSRD byte ever
enters SQLite, so none lingers in its journal, WAL or free pages.

A `Change` is made durable in one batch, in this order: new block files written and fsynced
before their rows; the SQL in one transaction (`record`: callers use allocated bytes only once
it committed, so an allocation is on disk before use); the consumed ranges overwritten in place
with zeros, spent blocks zeroed whole and unlinked (`wipe`). All of it is one worker-thread job
per batch. The zeroed ranges are fdatasync'd at once when no batch waits, and under load with
a later batch, at most `SYNC_EVERY` after theirs (one fdatasync per touched file and period,
not per batch). A crash before the zeros reach the disk leaves spent bytes in a block file,
never reusable (the pointer and used ranges are committed); `load` zeroes them on the next
start (the scrub), as it does orphaned files of blocks whose row never committed.

Concurrent callers share batches (group commit): one transaction for all changes that queued
while the previous batch was on disk.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from qkdagent import create_secret_file, destroy_file, sync_directory, zero_range

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

_T = TypeVar("_T")
SYNC_EVERY = 0.25
"""Under load, zeroed ranges reach the disk (fdatasync) at most this many seconds after their
batch; a crash before that leaves them to the scrub at the next open."""

log = logging.getLogger("qkdagent.dske.store")


class StoreError(Exception):
    """The PSRD store could not make a change durable (disk full, I/O error)."""


@dataclass
class _Pending:
    change: Change
    wake: trio.Event = field(default_factory=trio.Event)
    finished: bool = False
    error: BaseException | None = None


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

    def __init__(
        self, path: Path, mine: str, extra_schema: str = "", *, inline: bool = False
    ) -> None:
        # PSRD is one-time-pad material: owner-only directories and files (SQLite gives its
        # -wal and -shm files the database file's mode), also when they already existed.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        self.path = path
        self.mine = mine
        self.inline = inline
        """Write batches on the trio thread (a hub's own process: its loop has nothing to do
        that does not wait for the batch, and a thread hop costs more CPU than the batch's
        Python work) instead of in a worker thread (inside the agent)."""
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
        self._dirty: set[str] = set()
        self._synced = 0.0
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
        sync_directory(self.blocks_dir)

    def _write_block(self, uuid: str, data: bytes) -> None:
        final = self._file(uuid)
        tmp = final.with_name(final.name + ".new")
        create_secret_file(tmp, data)  # disk full: no partial PSRD waits for the next scrub
        os.replace(tmp, final)

    def _destroy(self, path: Path) -> None:
        """Zero a whole block file on disk, then unlink it."""
        destroy_file(path)

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

    def wipe(self, changes: Sequence[Change], *, sync: bool = True) -> None:
        """Zero what `changes` spent, in place, and destroy spent blocks; the zeroed block
        files are fdatasync'd now (`sync`) or by a later call (`durable`: at most `SYNC_EVERY`
        later)."""
        for change in changes:
            for uuid, start, stop in change.wipe:
                zero_range(self._fd(uuid), start, stop)
                self._dirty.add(uuid)
        retire = [u for c in changes for u in c.retire]
        for uuid in retire:
            self._dirty.discard(uuid)
            if uuid in self._fds:
                os.close(self._fds.pop(uuid))
            self._destroy(self._file(uuid))
        if retire:
            self._sync_dir()
        if sync:
            self.sync()

    def sync(self) -> None:
        """fdatasync the block files zeroed since the last call."""
        dirty, self._dirty = self._dirty, set()
        self._synced = time.monotonic()
        for uuid in dirty:
            os.fdatasync(self._fds[uuid])

    def _batch(self, changes: Sequence[Change]) -> OSError | None:
        """One worker-thread job per batch: `record`, then `wipe` (its error returned: the
        changes are durable all the same, and the scrub at the next open zeroes the rest)."""
        self.record(changes)
        try:
            self.wipe(changes, sync=time.monotonic() - self._synced >= SYNC_EVERY)
        except OSError as exc:
            return exc
        return None

    def execute(self, statements: Sequence[Statement]) -> None:
        """All statements in one durable transaction, or none of them."""
        if not statements:
            return
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            # runs of the same statement (a batch's used ranges, pointers) in one executemany
            for sql, group in itertools.groupby(statements, key=lambda s: s[0]):
                conn.executemany(sql, [params for _, params in group])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def durable(self, change: Change) -> None:
        """Return once `change` is recorded on disk (`record`) and its spent bytes are zeroed in
        their block files (`wipe`); one worker-thread job per batch. Changes queued while a
        batch is being written go together in the next one (group commit). The zeroed files
        are fdatasync'd in the same job at most `SYNC_EVERY` apart under load, and at once
        when the queue runs empty. Shielded: the in-memory view has changed already, so the
        disk must follow even if the caller is cancelled."""
        if not change:
            return
        entry = _Pending(change)
        self._queue.append(entry)
        with trio.CancelScope(shield=True):
            if self._busy:
                await entry.wake.wait()  # done, or woken to lead the next batch
            if not entry.finished:
                self._busy = True
                if self.inline:  # let the requests already read queue their changes too
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                batch, self._queue = self._queue, []
                wiped: OSError | None = None
                try:
                    wiped = await self._run(self._batch, [e.change for e in batch])
                except (OSError, sqlite3.Error) as exc:
                    for e in batch:
                        e.error = exc
                for e in batch:
                    e.finished = True
                    e.wake.set()
                if not self._queue and self._dirty:  # idle: the zeros to disk now
                    try:
                        await self._run(self.sync)
                    except OSError as exc:
                        wiped = exc
                if wiped is not None:  # the scrub at the next open zeroes them
                    log.error("PSRD store %s: zeroing spent PSRD failed: %s", self.path, wiped)
                if self._queue:
                    self._queue[0].wake.set()
                else:
                    self._busy = False
        if entry.error is not None:
            raise StoreError(f"PSRD store {self.path}: {entry.error}") from None

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self.inline:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

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
                    zero_range(fd, start, stop)
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
        try:
            self.sync()
        except OSError as exc:  # the scrub at the next open zeroes them
            log.error("PSRD store %s: zeroing spent PSRD failed: %s", self.path, exc)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.conn.close()


__all__ = ["PsrdError", "PsrdStore", "StoreError"]
