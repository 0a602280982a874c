"""What every backend does: apply a batch of PSK operations on one interface and report outcomes.

A batch is a list of `Op`s for distinct peers. A write op sets `expect` as the peer's PSK and
must show evidence that the peer exists (an `update_only` write to a missing peer is silently a
no-op); a read op compares the key the peer holds against `expect`. Backends answer with an
`Outcome` per op, never with key bytes, so the broker can serve them without handing keys back.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .drive import Exchange


class Outcome(enum.Enum):
    MATCH = "match"
    """The peer holds exactly the expected key (for a write: the peer exists and the device
    accepted the key)."""
    MISMATCH = "mismatch"
    """The peer holds another key."""
    NO_PSK = "no_psk"
    """The peer has no PSK at all."""
    NO_PEER = "no_peer"
    """The interface has no such peer (an `update_only` write did nothing)."""


@dataclass(frozen=True, slots=True)
class Op:
    peer: bytes
    """The peer's public key (32 raw bytes)."""
    expect: bytes
    """The key the peer should hold afterwards."""
    write: bool
    """Write `expect` as the peer's PSK before reading back."""

    def __repr__(self) -> str:
        return f"Op(peer=..., write={self.write}, expect=<redacted>)"


class BackendError(Exception):
    """The whole batch failed (interface missing, socket refused, errno from the device)."""


class Backend(Protocol):
    """`exchange` is a generator over non-blocking sockets, run by `drive.drive` on the trio
    thread (the agent) or `drive.drive_blocking` (the broker); one exchange at a time per
    interface (the batcher's job), several interfaces may interleave."""

    name: str
    timeout: float

    def exchange(self, interface: str, ops: Sequence[Op]) -> Exchange[list[Outcome]]: ...

    def close(self) -> None: ...


def compare(ops: Sequence[Op], held: Mapping[bytes, bytes | None]) -> list[Outcome]:
    """Outcomes from the peers' keys as read back (`held`: public key -> PSK or None)."""
    outcomes = []
    for op in ops:
        if op.peer not in held:
            outcomes.append(Outcome.NO_PEER)
            continue
        current = held[op.peer]
        if current is None or not any(current):
            outcomes.append(Outcome.NO_PSK)
        elif hmac.compare_digest(current, op.expect):
            outcomes.append(Outcome.MATCH)
        else:
            outcomes.append(Outcome.MISMATCH)
    return outcomes
