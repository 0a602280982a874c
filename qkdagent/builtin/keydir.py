"""Source type `keydir` (registered by the `memory` plugin): a simulated link through a directory.

The crash-and-restart tests run agents as separate processes; they need a key source both can
reach, and this is the smallest one: the initiator writes each key to `<directory>/<key ID>`
(0600), the responder takes it by renaming it away (atomic, so a key is taken at most once) and
deleting it. Test use only: keys sit in plain files.
"""

from __future__ import annotations

import os
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
        (not a regular file of at most `MAX_KEY_SIZE` bytes: a `SourceError`, where a FIFO
        would have hung the read and a huge file filled memory) and delete it."""
        if "/" in key_id or "\0" in key_id or key_id.startswith("."):
            raise KeyNotFound(f"no key {key_id!r}")
        directory = os.fspath(self.directory)
        taken = os.path.join(directory, f".taken-{uuid.uuid4().hex}")
        try:
            os.rename(os.path.join(directory, key_id), taken)
        except FileNotFoundError:
            raise KeyNotFound(f"no key {key_id!r} in {self.directory}") from None
        try:
            value, _ = read_regular_file(taken, limit=MAX_KEY_SIZE, what="key file")
        except FileCheckError as exc:
            raise SourceError(f"key {key_id!r}: {exc}") from None
        finally:
            os.unlink(taken)
        return Key(key_id, Secret(value))
