"""One end's durable key pool: established BB84 key on disk until it is handed out, then gone.

Layout of the pool directory (0700, the source's `context.private_dir`):

- `<run>-<block>.<size>.key` (0600): one verified block's final key, cut into pieces of `size`
  bytes; piece `i` is key ID `<run>-<block>-<i>`. Written as `<name>.new`, fsynced, renamed
  and the directory fsynced (`stage` then `publish`): a block is in the pool whole or not at
  all.
- `next-block`: the next block number the link may run (written atomically before a block
  runs), so a seeded link never runs a block number twice, even after a crash.

There is no database and no journal: a piece's bytes are its state. Taking a piece reads it,
overwrites it in place with zeros and fdatasyncs the file **before** returning it, so a piece is
handed out at most once, also across a crash (a crash before the fdatasync returned means the
caller never got the key). An all-zero piece is a used one (a genuine all-zero piece of >= 16
bytes has probability <= 2^-128). A file whose pieces are all used is unlinked (its bytes are
already zeros). Opening the pool scrubs what a crash left: staged `.new` files (a block cut off
mid-way) are zeroed and unlinked, so that block is lost, never half-used.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from qkdagent import create_secret_file, destroy_file, sync_directory, zero_range

_FILE = re.compile(r"^([0-9a-f]{8}-[0-9]{1,12})\.([0-9]{2,4})\.key$")
_ID = re.compile(r"^([0-9a-f]{8}-[0-9]{1,12})-([0-9]{1,9})$")
_COUNTER = "next-block"
_MAX_COUNTER = 32


class StoreError(Exception):
    """The pool directory could not be read or written (its message names no key bytes)."""


@dataclass
class _Block:
    path: Path
    size: int
    unused: dict[int, None] = field(default_factory=dict)
    """Unused pieces in order (a dict as an ordered set)."""


class KeyStore:
    """The pool of one end of one simulated link (thread-safe: blocks arrive from a worker)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._blocks: OrderedDict[str, _Block] = OrderedDict()
        self._staged: dict[str, tuple[Path, Path, int]] = {}
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)
            self.next_block = self._read_counter()
            self._load()
        except OSError as exc:
            raise StoreError(f"bb84 pool {directory}: {exc.strerror or exc}") from None

    def __repr__(self) -> str:
        return f"<KeyStore {self.directory} pieces={self.level()}>"

    # -- opening --------------------------------------------------------------------------

    def _read_counter(self) -> int:
        try:
            with open(self.directory / _COUNTER, "rb") as f:
                text = f.read(_MAX_COUNTER + 1)
        except FileNotFoundError:
            return 0
        if len(text) > _MAX_COUNTER or not text.strip().isdigit():
            raise StoreError(f"bb84 pool {self.directory}: {_COUNTER} is not a number")
        return int(text)

    def _load(self) -> None:
        """Scrub staged leftovers; index every piece that is not zeros, oldest block first."""
        found = []
        for entry in os.scandir(self.directory):
            path = Path(entry.path)
            if entry.name.endswith(".new") and entry.is_file(follow_symlinks=False):
                destroy_file(path)  # a block a crash cut off: lost, never half-used
                continue
            match = _FILE.match(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name, match))
        for _, name, match in sorted(found):
            path = self.directory / name
            size = int(match.group(2))
            with open(path, "rb") as f:
                data = f.read()
            zero = bytes(size)
            unused = dict.fromkeys(
                i for i in range(len(data) // size) if data[i * size : (i + 1) * size] != zero
            )
            if unused:
                self._blocks[match.group(1)] = _Block(path, size, unused)
            else:
                destroy_file(path)

    # -- blocks arriving ----------------------------------------------------------------------

    def reserve(self, number: int) -> None:
        """Record durably that block numbers below `number + 1` are spent (before running it)."""
        with self._lock:
            if number < self.next_block:
                return
            final = self.directory / _COUNTER
            tmp = final.with_name(_COUNTER + ".tmp")
            tmp.unlink(missing_ok=True)
            create_secret_file(tmp, str(number + 1).encode())
            os.replace(tmp, final)
            sync_directory(self.directory)
            self.next_block = number + 1

    def stage(self, block_id: str, key: bytes, size: int) -> None:
        """Write a block's key to a staged file (not yet in the pool)."""
        if not _ID.match(block_id + "-0") or not 16 <= size <= 9999:
            raise ValueError("bad block ID or piece size")
        final = self.directory / f"{block_id}.{size}.key"
        tmp = final.with_name(final.name + ".new")
        whole = len(key) // size * size
        create_secret_file(tmp, key[:whole])
        with self._lock:
            self._staged[block_id] = (tmp, final, size)

    def discard(self, block_id: str) -> None:
        """Destroy a staged block that will not be published (the other end did not confirm)."""
        with self._lock:
            staged = self._staged.pop(block_id, None)
        if staged is not None:
            destroy_file(staged[0])

    def holds(self, block_id: str) -> bool:
        """Whether the pool has (unused pieces of) block `block_id`, or has it staged."""
        with self._lock:
            return block_id in self._blocks or block_id in self._staged

    def bits(self) -> int:
        """Unused key bits in the pool (a metric)."""
        with self._lock:
            return sum(len(b.unused) * b.size * 8 for b in self._blocks.values())

    def publish(self, block_id: str) -> None:
        """Make a staged block part of the pool (rename, then fsync the directory)."""
        with self._lock:
            tmp, final, size = self._staged.pop(block_id)
            os.replace(tmp, final)
            sync_directory(self.directory)
            pieces = os.stat(final).st_size // size
            if pieces:
                self._blocks[block_id] = _Block(final, size, dict.fromkeys(range(pieces)))

    # -- handing out --------------------------------------------------------------------------

    def level(self) -> int:
        with self._lock:
            return sum(len(b.unused) for b in self._blocks.values())

    def take_oldest(self) -> tuple[str, bytes] | None:
        """The oldest unused piece (ID, bytes), destroyed on disk before it is returned."""
        with self._lock:
            for block_id, block in self._blocks.items():
                if block.unused:
                    piece = next(iter(block.unused))
                    return f"{block_id}-{piece}", self._take(block_id, block, piece)
            return None

    def take(self, key_id: str) -> bytes | None:
        """The piece `key_id` once (destroyed on disk first); None if unknown or used."""
        match = _ID.match(key_id)
        if not match:
            return None
        with self._lock:
            block = self._blocks.get(match.group(1))
            piece = int(match.group(2))
            if block is None or piece not in block.unused:
                return None
            return self._take(match.group(1), block, piece)

    def _take(self, block_id: str, block: _Block, piece: int) -> bytes:
        del block.unused[piece]  # first: a failure below loses it (it was never returned)
        if not block.unused:
            del self._blocks[block_id]
        start = piece * block.size
        fd = os.open(block.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            value = os.pread(fd, block.size, start)
            zero_range(fd, start, start + block.size)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if not block.unused:
            block.path.unlink()  # every byte already zeroed and synced
        return value
