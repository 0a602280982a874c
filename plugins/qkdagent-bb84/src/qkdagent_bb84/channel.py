"""The authenticated classical channel between Alice and Bob (in-process, pure).

Every classical message of a block (sifting, the disclosed sample, Cascade parities and queries,
the verification tag, the privacy-amplification seed) goes through `send`, which appends an
HMAC-SHA256 tag over (direction, sequence number, kind, payload) under the link's
authentication key, and checks it at the receiving end with that end's key and sequence counter.
A message altered, dropped, replayed or reordered on the way fails the check: `AuthError`, and
the block aborts. The receiver goes on from the bytes it received (never from the sender's
objects), so what is authenticated is what is used.

Why HMAC keyed from a configured secret and not Wegman-Carter with key from the previous block:
HMAC consumes no QKD key (so the privacy-amplification length subtracts nothing for it) and
needs no bootstrap key for the first block; its security is computational, which the README
states. `tamper` is the test hook that plays the man in the middle.
"""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

ALICE, BOB = "alice", "bob"
TAG_BYTES = 32
MIN_KEY_BYTES = 16

Tamper = Callable[[str, str, bytes, bytes], tuple[bytes, bytes]]
"""(sender, kind, payload, tag) -> (payload, tag) as delivered."""


class AuthError(Exception):
    """A classical message failed authentication: the block must abort."""


class ChannelError(Exception):
    """The connection to the other end failed (closed, timed out): the block must abort."""


class Messages(Protocol):
    """What the engine sends through: the in-process `Channel` or a `NetEnd` (`netend.py`)."""

    def send(self, sender: str, kind: str, payload: bytes) -> bytes: ...

    def knows(self, role: str) -> bool: ...


def mac(key: bytes, sender: str, seq: int, kind: str, payload: bytes) -> bytes:
    header = f"{sender}\0{seq}\0{kind}\0{len(payload)}\0".encode()
    return hmac.digest(key, header + payload, "sha256")


@dataclass
class Channel:
    """Both ends of one block's classical channel: each end holds its own copy of the key."""

    alice_key: bytes = field(repr=False)
    bob_key: bytes = field(repr=False)
    tamper: Tamper | None = field(default=None, repr=False)
    sent: Counter[str] = field(default_factory=Counter)
    """Messages per kind (figures: what the block exchanged)."""
    bytes_sent: int = 0
    _seq: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if min(len(self.alice_key), len(self.bob_key)) < MIN_KEY_BYTES:
            raise ValueError(f"authentication key shorter than {MIN_KEY_BYTES} bytes")
        # per direction: [sender's next sequence number, receiver's expected one]
        self._seq = {ALICE: [0, 0], BOB: [0, 0]}

    def knows(self, role: str) -> bool:
        """Whether this process holds `role`'s own data (in-process: both ends)."""
        return True

    @classmethod
    def shared(cls, key: bytes, tamper: Tamper | None = None) -> Channel:
        return cls(key, key, tamper)

    def send(self, sender: str, kind: str, payload: bytes) -> bytes:
        """Deliver `payload` from `sender` to the other end; return what the receiver accepts."""
        counters = self._seq[sender]
        own = self.alice_key if sender == ALICE else self.bob_key
        peer = self.bob_key if sender == ALICE else self.alice_key
        tag = mac(own, sender, counters[0], kind, payload)
        counters[0] += 1
        self.sent[kind] += 1
        self.bytes_sent += len(payload) + TAG_BYTES
        if self.tamper is not None:
            payload, tag = self.tamper(sender, kind, payload, tag)
        expected = mac(peer, sender, counters[1], kind, payload)
        counters[1] += 1
        if not hmac.compare_digest(tag, expected):
            raise AuthError(f"classical message {kind!r} from {sender} failed authentication")
        return payload


def block_key(secret: bytes, block_id: str) -> bytes:
    """The HMAC key of one block, from the configured secret and the block's public ID: the
    sequence numbers restart every block, so one key per block keeps a message recorded in one
    block from verifying in another."""
    return hmac.digest(secret, f"qkdagent-bb84 channel\0{block_id}".encode(), "sha256")


def pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(bits).tobytes()


def unpack_bits(payload: bytes, count: int, what: str) -> np.ndarray:
    """`count` 0/1 bits from a received message; a wrong length is a malformed message."""
    if len(payload) != (count + 7) // 8:
        raise AuthError(f"malformed {what}: {len(payload)} bytes for {count} bits")
    return np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=count)


def unauthenticated() -> Channel:
    """A channel for the reconciliation algorithm alone (benchmarks, property tests): a fixed
    public key, so it still exercises the message path but authenticates nothing."""
    return Channel.shared(b"\0" * MIN_KEY_BYTES)
