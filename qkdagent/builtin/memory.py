"""Built-in plugin `memory`: simulated key links for the demo, tests and benchmarks.

`MemoryPool` stands in for a pair of QKD devices: the initiator's source draws a fresh key into
the pool and the responder's source takes it out by ID, exactly once. Two agents in one process
share a pool by name (`pool = "..."` in the config), which is how the demo and the agent-pair
fixture simulate a link without any device.

This module is the `memory` entry point. Besides the `memory` source it registers `keydir` (a
simulated link through a directory, for agents in separate processes) and `recording` (a sink
that keeps what it was given in memory). None of them needs pytest: the demo runs on a bare
install. The test kit (`qkdagent.testing`) re-exports them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import trio

from ..errors import KeyNotFound, SourceUnavailable
from ..hookspecs import hookimpl
from ..interfaces import Link, PluginContext, Sink, Source
from ..options import Options
from ..secret import Key, Secret
from .keydir import KeyDirSource
from .recording import RecordingSink


@dataclass
class MemoryPool:
    """Keys handed out by one side and not yet taken by the other; single-use by construction."""

    name: str
    key_size: int = 32
    down: bool = False
    """While true, every call fails as an unreachable device would."""
    delay: float = 0.0
    keys: dict[str, bytes] = field(default_factory=dict)
    taken: int = 0
    keep_history: bool = False
    history: list[Key] = field(default_factory=list)
    """With `keep_history`, every key issued (leak tests search logs for them)."""

    _registry: ClassVar[dict[str, MemoryPool]] = {}

    @classmethod
    def named(cls, name: str, key_size: int = 32) -> MemoryPool:
        pool = cls._registry.get(name)
        if pool is None:
            pool = cls._registry[name] = cls(name, key_size)
        return pool

    @classmethod
    def forget(cls, name: str) -> None:
        cls._registry.pop(name, None)

    def issue(self) -> Key:
        if self.down:
            raise SourceUnavailable(f"memory pool {self.name!r} is down")
        key_id = str(uuid.uuid4())
        value = os.urandom(self.key_size)
        self.keys[key_id] = value
        key = Key(key_id, Secret(value))
        if self.keep_history:
            self.history.append(key)
        return key

    def take(self, key_id: str) -> Key:
        if self.down:
            raise SourceUnavailable(f"memory pool {self.name!r} is down")
        value = self.keys.pop(key_id, None)
        if value is None:
            raise KeyNotFound(f"memory pool {self.name!r} holds no key {key_id!r}")
        self.taken += 1
        return Key(key_id, Secret(value))


class MemorySource(Source):
    """Source type `memory`: a simulated link shared by the agents of one process."""

    type_name = "memory"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        pool = options.string("pool", "default", max_len=200)
        size = options.integer("key_size", 32, min=16, max=4096)
        self.pool = MemoryPool.named(pool, size)
        # a pool standing in for a remote source (its `delay` a round trip): announce ahead
        self.fetch_ahead = options.boolean("fetch_ahead", False)

    async def new_key(self, link: Link) -> Key:
        await self._pause()
        return self.pool.issue()

    async def key_by_id(self, link: Link, key_id: str) -> Key:
        await self._pause()
        return self.pool.take(key_id)

    async def _pause(self) -> None:
        if self.pool.delay:
            await trio.sleep(self.pool.delay)
        else:
            await trio.lowlevel.checkpoint()


@hookimpl
def qkdagent_register_sources(register: Callable[[type[Source]], None]) -> None:
    register(MemorySource)
    register(KeyDirSource)


@hookimpl
def qkdagent_register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(RecordingSink)


__all__ = ["KeyDirSource", "MemoryPool", "MemorySource", "RecordingSink"]
