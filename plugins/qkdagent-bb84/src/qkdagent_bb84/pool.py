"""A simulated BB84 link shared by the two agents of one process, feeding each end's pool.

Both ends of the simulated link live in one `Bb84Link`, found by name (`link = "..."` in both
agents' source tables), as the core's `memory` source shares a `MemoryPool`: this is a
simulation, and its keys are only as secret as the process. Each agent's source attaches its own
durable `KeyStore` (in that agent's state directory) as one end. A verified block is staged in
every end's store, then published in each, the responder's first: a crash between the two leaves
pieces only the responder holds (never named by the initiator), never an ID the initiator hands
out that the responder lacks. Blocks run only while both ends are attached, so neither pool
fills with pieces the other end never got. Key IDs are `<run>-<block>-<piece>`, `run` random
per link object, so IDs never repeat after a restart; block numbers come from the stores'
durable counters, so a seeded link never runs (never re-derives the key of) a block number
twice.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field, replace
from typing import ClassVar

from .channel import block_key
from .engine import BlockResult, Settings, run_block
from .store import KeyStore


@dataclass
class LinkStats:
    blocks: int = 0
    aborted: int = 0
    key_bits: int = 0
    pulses: int = 0
    last: BlockResult | None = None


@dataclass
class End:
    store: KeyStore
    alice: bool
    """Gets Alice's final key (the initiator's end); the other end gets Bob's."""
    auth_secret: bytes | None = field(default=None, repr=False)
    """This end's copy of the classical channel's HMAC secret (None: a random key per block)."""


@dataclass
class Bb84Link:
    name: str
    settings: Settings
    key_size: int
    seed: int = field(repr=False)
    """Determines every simulated bit, so every key: secret."""
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    stats: LinkStats = field(default_factory=LinkStats)
    _ends: dict[str, End] = field(default_factory=dict, repr=False)
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

    def attach(
        self, end: str, store: KeyStore, *, alice: bool, auth_secret: bytes | None = None
    ) -> None:
        """Make `store` the pool of end `end` (an agent); a link has at most two ends, and
        either both or neither have an authentication secret."""
        with self._lock:
            if end not in self._ends and len(self._ends) >= 2:
                raise ValueError(f"bb84 link {self.name!r} already has two ends")
            others = [e for name, e in self._ends.items() if name != end]
            if any((e.auth_secret is None) != (auth_secret is None) for e in others):
                raise ValueError(f"bb84 link {self.name!r}: auth_key is set at one end only")
            self._ends[end] = End(store, alice, auth_secret)
            self._next_block = max(self._next_block, store.next_block)

    def complete(self) -> bool:
        """Both ends attached: blocks may run."""
        with self._lock:
            return len(self._ends) == 2

    def detach(self, end: str, store: KeyStore) -> None:
        with self._lock:
            if end in self._ends and self._ends[end].store is store:
                del self._ends[end]

    @staticmethod
    def _auth(ends: list[End], block_id: str) -> tuple[bytes, bytes] | None:
        """(Alice's, Bob's) HMAC keys of a block from each end's own secret, or None (random)."""
        secrets_ = [e.auth_secret for e in sorted(ends, key=lambda e: not e.alice)]
        if len(secrets_) != 2 or secrets_[0] is None or secrets_[1] is None:
            return None
        return block_key(secrets_[0], block_id), block_key(secrets_[1], block_id)

    def produce(self) -> BlockResult:
        """Run one block (blocking: call it in a worker thread) and pool its keys if verified."""
        with self._lock:
            number = self._next_block
            self._next_block += 1
            ends = list(self._ends.values())
        for end in ends:  # before the block runs: its number is spent whatever happens next
            end.store.reserve(number)
        block_id = f"{self.run_id}-{number}"
        result = run_block(self.settings, (self.seed, number), self._auth(ends, block_id))
        with self._lock:
            self.stats.blocks += 1
            self.stats.pulses += result.pulses
            self.stats.last = replace(result, alice_key=b"", bob_key=b"")  # figures only
            if not result.ok:
                self.stats.aborted += 1
                return result
            self.stats.key_bits += result.key_bits
        for end in ends:
            key = result.alice_key if end.alice else result.bob_key
            end.store.stage(block_id, key, self.key_size)
        for end in sorted(ends, key=lambda e: e.alice):  # responders first
            end.store.publish(block_id)
        return result
