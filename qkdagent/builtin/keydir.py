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

from ..errors import KeyNotFound
from ..fileutil import write_secret_file
from ..inline import CACHE, DISK, loop_gate
from ..interfaces import Link, PluginContext, Source
from ..options import Options
from ..secret import Key, Secret


class KeyDirSource(Source):
    type_name = "keydir"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.directory: Path = options.path("directory")
        self.key_size = options.integer("key_size", 32, min=16, max=4096)

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
        if "/" in key_id or key_id.startswith("."):
            raise KeyNotFound(f"no key {key_id!r}")
        taken = self.directory / f".taken-{uuid.uuid4().hex}"
        try:
            os.rename(self.directory / key_id, taken)
        except FileNotFoundError:
            raise KeyNotFound(f"no key {key_id!r} in {self.directory}") from None
        try:
            return Key(key_id, Secret(taken.read_bytes()))
        finally:
            taken.unlink()
