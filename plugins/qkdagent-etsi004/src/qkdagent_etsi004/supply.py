"""Where a simulated QKD link's key bits come from (the same seam as kme-sim's supply).

`KeySupply` is structural: anything with `available_bits()` and `take(bits)` (kme-sim's
`CsprngSupply`, a BB84 engine later) backs a 004 module, so one simulated link can feed a 014
KME and a 004 module at once. Plugins cannot import each other, hence this small copy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol


class SupplyExhausted(Exception):
    """The store holds fewer bits than requested; nothing was taken."""


class KeySupply(Protocol):
    def available_bits(self) -> int: ...

    def take(self, bits: int) -> bytes: ...


class CsprngSupply:
    """A link producing `rate_bps` secret bits per second into a store of `capacity_bits`."""

    def __init__(
        self,
        *,
        rate_bps: float,
        capacity_bits: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_bps < 0 or capacity_bits <= 0:
            raise ValueError("rate must be >= 0 and capacity > 0")
        self.rate_bps = rate_bps
        self.capacity_bits = capacity_bits
        self._clock = clock
        self._level = float(capacity_bits)
        self._at = clock()

    def available_bits(self) -> int:
        now = self._clock()
        if now > self._at:
            self._level = min(self.capacity_bits, self._level + (now - self._at) * self.rate_bps)
        self._at = now
        return int(self._level)

    def take(self, bits: int) -> bytes:
        if bits < 0 or bits % 8:
            raise ValueError("bits must be a non-negative multiple of 8")
        if bits > self.available_bits():
            raise SupplyExhausted(f"{bits} bits requested, {int(self._level)} stored")
        self._level -= bits
        return os.urandom(bits // 8)

    def drain(self) -> None:
        self.available_bits()
        self._level = 0.0
