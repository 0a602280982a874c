"""Source `example-shareddir`: single-use keys from a directory both hosts hold a copy of.

Something outside qkdagent (a QKD device's export, a courier with a sealed disk) fills a
directory on each host with the same key files, one key per file, named by its key ID. The
initiator takes the first file in name order; the responder takes the file the peer names.
Taking a key renames it away and deletes it, so a key is used at most once, also by several
agents or processes sharing the directory.

What it shows a plugin author: options read and checked in `__init__` (no I/O there), a
`prepare()` that fails with a typed error, untrusted key IDs from the peer checked before they
touch the file system, bounded reads, blocking file I/O in a worker thread, state shared by the
components of one agent through `context.stash`, and a background `run()` task that reports a
low pool with `context.report`.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from pathlib import Path

import trio
from qkdagent import (
    ComponentEvent,
    Key,
    KeyNotFound,
    Link,
    Misconfigured,
    Options,
    PluginContext,
    Secret,
    Source,
    SourceError,
    SourceUnavailable,
    StashKey,
)

KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
"""Key IDs this source accepts (from the peer, too): a plain file name, never a path."""

LOCKS: StashKey[dict[str, trio.Lock]] = StashKey("example.directory-locks")
"""One lock per directory per agent: two sources of one agent on the same directory would
otherwise race for the same first file (the rename keeps that safe, but one of them fails)."""


class SharedDirSource(Source):
    type_name = "example-shareddir"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.directory: Path = options.path("directory")
        self.key_size = options.integer("key_size", 32, min=16, max=1024)
        self.low_water = options.integer("low_water", 16, min=0, max=1_000_000)
        self.check_every = options.number("check_every", 60.0, positive=True, max=86400)
        locks = context.stash.setdefault(LOCKS, dict)
        self._lock = locks.setdefault(os.path.abspath(self.directory), trio.Lock())

    async def prepare(self) -> None:
        await trio.to_thread.run_sync(self._check_directory)  # file system calls can block

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report once when fewer than `low_water` keys are left, and again after a refill."""
        task_status.started()
        low = False
        while True:
            left = await trio.to_thread.run_sync(self._count)
            if left < self.low_water and not low:
                detail = f"{left} keys left in {self.directory} (low_water = {self.low_water})"
                self.context.report(ComponentEvent(self.name, "low_keys", detail))
            low = left < self.low_water
            await trio.sleep(self.check_every)

    async def new_key(self, link: Link) -> Key:
        async with self._lock:
            return await trio.to_thread.run_sync(self._take_first)

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        if not KEY_ID.match(key_id):
            raise KeyNotFound(f"source {self.name!r}: not a key ID this source issues")
        async with self._lock:
            return await trio.to_thread.run_sync(self._take, key_id)

    # -- blocking helpers, run in a worker thread ---------------------------------------------

    def _check_directory(self) -> None:
        if not self.directory.is_dir():
            raise Misconfigured(f"source {self.name!r}: {self.directory} is not a directory")
        if not os.access(self.directory, os.R_OK | os.W_OK | os.X_OK):
            raise Misconfigured(f"source {self.name!r}: cannot take keys from {self.directory}")

    def _names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.directory) if KEY_ID.match(n))
        except OSError as exc:
            raise SourceUnavailable(f"source {self.name!r}: {exc.strerror}") from None

    def _count(self) -> int:
        try:
            return len(self._names())
        except SourceUnavailable:
            return 0

    def _take_first(self) -> Key:
        for name in self._names():
            try:
                return self._take(name)
            except KeyNotFound:
                continue  # another process took it first
        raise SourceUnavailable(f"source {self.name!r}: no keys left in {self.directory}")

    def _take(self, key_id: str) -> Key:
        taken = self.directory / f".taken-{uuid.uuid4().hex}"
        try:
            os.rename(self.directory / key_id, taken)
        except FileNotFoundError:
            raise KeyNotFound(f"source {self.name!r}: no key {key_id!r}") from None
        except OSError as exc:
            raise SourceUnavailable(f"source {self.name!r}: {exc.strerror}") from None
        try:
            # not through a symbolic link, never blocking on a FIFO, only a regular file
            fd = os.open(taken, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise SourceError(f"source {self.name!r}: key {key_id!r} is not a file")
                value = os.read(fd, self.key_size + 1)  # bounded: never more than one key
            finally:
                os.close(fd)
        except OSError as exc:
            raise SourceError(f"source {self.name!r}: key {key_id!r}: {exc.strerror}") from None
        finally:
            taken.unlink()
        if len(value) != self.key_size:
            raise SourceError(f"source {self.name!r}: key {key_id!r} is not {self.key_size} bytes")
        return Key(key_id, Secret(value))
