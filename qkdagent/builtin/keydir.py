"""Source type `keydir` (registered by the `memory` plugin): a simulated link through a directory.

The crash-and-restart tests run agents as separate processes; they need a key source both can
reach, and this is the smallest one: the initiator writes each key to `<directory>/<key ID>`
(0600), the responder takes it by renaming it away (atomic, so a key is taken at most once) and
deleting it. Test use only: keys sit in plain files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from functools import partial
from pathlib import Path

from ..errors import KeyNotFound, SourceError
from ..fileutil import FileCheckError, read_regular_file, write_secret_file
from ..inline import CACHE, DISK, loop_gate
from ..interfaces import Link, PluginContext, Source
from ..options import Options
from ..secret import Key, Secret

MAX_KEY_SIZE = 4096
"""Largest `key_size`, and the most a key file is read for (whatever else sits there)."""


class KeyDirSource(Source):
    type_name = "keydir"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.directory: Path = options.path("directory")
        self.key_size = options.integer("key_size", 32, min=16, max=MAX_KEY_SIZE)

    async def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def new_key(self, link: Link) -> Key:
        key_id = str(uuid.uuid4())
        value = os.urandom(self.key_size)
        # small file operations: on the loop while they are fast (inline.loop_gate); the new
        # key's file is fsynced, taking one (a rename, a read, an unlink) is not
        await loop_gate(DISK).run(partial(write_secret_file, self.directory / key_id, value))
        return Key(key_id, Secret(value))

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        return await loop_gate(CACHE).run(partial(self._take, key_id))

    def _take(self, key_id: str) -> Key:
        """Take the key's file by renaming it away (at most one taker), read it with a bound
        and delete it. What the key ID names is not a regular file of at most `MAX_KEY_SIZE`
        bytes (a FIFO would hang the read, a huge file fill memory, a symbolic link lead
        elsewhere): a `SourceError`, and it is removed all the same."""
        if "/" in key_id or "\0" in key_id or key_id.startswith("."):
            raise KeyNotFound(f"no key {key_id!r}")
        directory = os.fspath(self.directory)
        taken = os.path.join(directory, f".taken-{uuid.uuid4().hex}")
        try:
            os.rename(os.path.join(directory, key_id), taken)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG):
                raise KeyNotFound(f"no key {key_id!r} in {self.directory}") from None
            raise SourceError(f"cannot take key {key_id!r}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.lstat(taken).st_mode):
                raise SourceError(f"key {key_id!r} is not a regular file")
            value, _ = read_regular_file(taken, limit=MAX_KEY_SIZE, what="key file")
        except FileCheckError as exc:
            raise SourceError(f"key {key_id!r}: {exc}") from None
        finally:
            _remove(taken)
        return Key(key_id, Secret(value))


def _remove(path: str) -> None:
    """Remove a taken file (a directory if that is what the key ID named, when empty)."""
    try:
        os.unlink(path)
    except IsADirectoryError:
        with contextlib.suppress(OSError):
            os.rmdir(path)
