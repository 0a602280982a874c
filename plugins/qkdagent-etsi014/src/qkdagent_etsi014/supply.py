"""Where a simulated QKD link's key bits come from.

`KeySupply` is the seam a BB84 engine plugs into later: the KME network only asks how many bits
are stored and takes bits out. `CsprngSupply` emulates a link of fixed secret key rate feeding a
bounded store, with the bits themselves drawn from the OS CSPRNG at the moment they are taken.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol


class SupplyExhausted(Exception):
    """The store holds fewer bits than requested; nothing was taken."""


class KeySupply(Protocol):
    """Secret bits shared by the two ends of one QKD link."""

    def available_bits(self) -> int:
        """Bits stored right now (both ends hold the same amount)."""
        ...

    def take(self, bits: int) -> bytes:
        """Remove `bits` bits (a multiple of 8) and return them; raise SupplyExhausted if short."""
        ...


class CsprngSupply:
    """A link producing `rate_bps` secret bits per second into a store of `capacity_bits`."""

    def __init__(
        self,
        *,
        rate_bps: float,
        capacity_bits: int,
        initial_bits: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_bps < 0 or capacity_bits <= 0:
            raise ValueError("rate must be >= 0 and capacity > 0")
        self.rate_bps = rate_bps
        self.capacity_bits = capacity_bits
        self._clock = clock
        self._level = float(capacity_bits if initial_bits is None else initial_bits)
        self._level = min(self._level, capacity_bits)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:
            self._level = min(self.capacity_bits, self._level + (now - self._at) * self.rate_bps)
        self._at = now

    def available_bits(self) -> int:
        self._refill()
        return int(self._level)

    def take(self, bits: int) -> bytes:
        if bits < 0 or bits % 8:
            raise ValueError("bits must be a non-negative multiple of 8")
        self._refill()
        if bits > self._level:
            raise SupplyExhausted(f"{bits} bits requested, {int(self._level)} stored")
        self._level -= bits
        return os.urandom(bits // 8)

    def drain(self, keep_bits: int = 0) -> None:
        """Empty the store down to `keep_bits` (tests: provoke 503 without waiting)."""
        self._refill()
        self._level = float(min(self._level, keep_bits))
