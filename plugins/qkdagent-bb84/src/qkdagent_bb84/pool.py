"""A simulated BB84 link shared by the two agents of one process, and its two key pools.

Both ends of the simulated link live in one `Bb84Link`, found by name (`link = "..."` in both
agents' source tables), as the core's `memory` source shares a `MemoryPool`: this is a
simulation, and its keys are only as secret as the process. Each verified block puts Alice's
final key into Alice's pool and Bob's into Bob's, cut into `key_size` pieces with the same IDs
(`<run>-<block>-<piece>`, `run` random per link object so IDs never repeat after a restart).
Alice's side hands out the oldest piece; Bob's side gives a piece only by ID, and only once.
Blocks are produced in a worker thread; the pools are guarded by a lock.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import ClassVar

from .engine import BlockResult, Settings, run_block


@dataclass
class LinkStats:
    blocks: int = 0
    aborted: int = 0
    key_bits: int = 0
    pulses: int = 0
    last: BlockResult | None = None


@dataclass
class Bb84Link:
    name: str
    settings: Settings
    key_size: int
    seed: int = field(repr=False)
    """Determines every simulated bit, so every key: secret."""
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    stats: LinkStats = field(default_factory=LinkStats)
    _alice: OrderedDict[str, bytes] = field(default_factory=OrderedDict, repr=False)
    _bob: dict[str, bytes] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _next_block: int = 0

    _registry: ClassVar[dict[str, Bb84Link]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def named(cls, name: str, settings: Settings, key_size: int, seed: int | None) -> Bb84Link:
        """The link called `name`, created with these settings by the first end to ask; the
        other end must ask with the same ones (else ValueError: the two ends disagree)."""
        with cls._registry_lock:
            link = cls._registry.get(name)
            if link is None:
                chosen = seed if seed is not None else secrets.randbits(63)
                link = cls._registry[name] = cls(name, settings, key_size, chosen)
            elif link.settings != settings or link.key_size != key_size:
                raise ValueError(f"bb84 link {name!r} is configured differently at its other end")
            return link

    @classmethod
    def forget(cls, name: str) -> None:
        with cls._registry_lock:
            cls._registry.pop(name, None)

    def level(self) -> int:
        """Pieces Alice can still hand out."""
        with self._lock:
            return len(self._alice)

    def produce(self) -> BlockResult:
        """Run one block (blocking: call it in a worker thread) and pool its keys if verified."""
        with self._lock:
            number = self._next_block
            self._next_block += 1
        result = run_block(self.settings, (self.seed, number))
        with self._lock:
            self.stats.blocks += 1
            self.stats.pulses += result.pulses
            self.stats.last = replace(result, alice_key=b"", bob_key=b"")  # figures only
            if not result.ok:
                self.stats.aborted += 1
                return result
            self.stats.key_bits += result.key_bits
            size = self.key_size
            for piece in range(len(result.alice_key) // size):
                key_id = f"{self.run_id}-{number}-{piece}"
                self._alice[key_id] = result.alice_key[piece * size : (piece + 1) * size]
                self._bob[key_id] = result.bob_key[piece * size : (piece + 1) * size]
        return result

    def take_alice(self) -> tuple[str, bytes] | None:
        with self._lock:
            if not self._alice:
                return None
            return self._alice.popitem(last=False)

    def take_bob(self, key_id: str) -> bytes | None:
        with self._lock:
            return self._bob.pop(key_id, None)
