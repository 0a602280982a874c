"""A simulated key link and a recording sink, for tests, benchmarks and the demo.

`MemoryPool` stands in for a pair of QKD devices: the initiator's source draws a fresh key into
the pool and the responder's source takes it out by ID, exactly once. Two agents in one process
share a pool by name (`pool = "..."` in the config), which is how the demo and the agent-pair
fixture simulate a link without any device.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

import trio

from ..errors import KeyNotFound, Misconfigured, SinkError, SourceUnavailable
from ..interfaces import KeyMeta, Link, PluginContext, Sink, Source
from ..options import Options
from ..secret import Key, Secret

log = logging.getLogger(__name__)


@dataclass
class MemoryPool:
    """Keys handed out by one side and not yet taken by the other; single-use by construction."""

    name: str
    key_size: int = 32
    down: bool = False
    """While true, every call fails as an unreachable device would."""
    delay: float = 0.0
    keys: dict[str, bytes] = field(default_factory=dict)
    issued: int = 0
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
        self.issued += 1
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


@dataclass(frozen=True)
class InstallRecord:
    """What a recording sink saw; the secret is kept only as a fingerprint."""

    time: float
    link: str
    epoch: int
    key_ids: tuple[str, ...]
    fingerprint: str


class RecordingSink(Sink):
    """Sink type `recording`: keeps the current secret per link in memory and records calls."""

    type_name = "recording"

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.delay = options.number("delay", 0.0, min=0)
        self.fail = options.boolean("fail", False)
        self.erase_failures = options.integer("erase_failures", 0, min=0)
        """How many of the next erase calls fail (as a full disk or a stopped daemon would);
        tests may also set it while the agent runs."""
        self.prepare_delay = options.number("prepare_delay", 0.0, min=0)
        self.prepare_error = options.string("prepare_error", "")
        self.prepare_bug = options.string("prepare_bug", "")
        """Raise a RuntimeError with this text from prepare(), as a buggy plugin would."""
        self.installs: list[InstallRecord] = []
        self.erasures: list[tuple[float, str, str]] = []
        self.current: dict[str, Secret] = {}
        self.history: list[Secret] = []
        """Every secret installed, kept so leak tests can search logs for all of them."""
        self.calls: list[str] = []
        """Installs and erasures in the order they happened: "install:EPOCH", "erase:REASON"."""

    async def prepare(self) -> None:
        if self.prepare_delay:
            await trio.sleep(self.prepare_delay)
        if self.prepare_error:
            raise Misconfigured(f"recording sink {self.name!r}: {self.prepare_error}")
        if self.prepare_bug:
            raise RuntimeError(self.prepare_bug)

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        else:
            await trio.lowlevel.checkpoint()
        if self.fail:
            raise SinkError(f"recording sink {self.name!r} is set to fail")
        self.current[link.name] = Secret(secret.reveal())
        self.history.append(self.current[link.name])
        self.installs.append(
            InstallRecord(
                trio.current_time(), link.name, meta.epoch, meta.key_ids, secret.fingerprint()
            )
        )
        self.calls.append(f"install:{meta.epoch}")

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        current = self.current.get(link.name)
        return current is not None and current == secret

    async def erase(self, link: Link, reason: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.erase_failures:
            self.erase_failures -= 1
            self.calls.append(f"erase-failed:{reason}")
            raise SinkError(f"recording sink {self.name!r} is set to fail erasing")
        self.current[link.name] = Secret.random(32)
        self.erasures.append((trio.current_time(), link.name, reason))
        self.calls.append(f"erase:{reason}")
