"""Where a simulated QKD link's key bits come from: the seam between simulators and link engines.

A simulator (`kme-sim` for ETSI 014, `qkdm-sim` for ETSI 004) only asks a link's supply how many
bits are stored and takes bits out. `CsprngSupply` emulates a link of fixed secret key rate; a
plugin can offer another engine (a simulated BB84 link) under the entry-point group
`qkdagent.supplies`, so every simulator can run on it without the plugins importing each other:

    [project.entry-points."qkdagent.supplies"]
    bb84 = "qkdagent_bb84.supply:make_supply_factory"

The entry point is `make_supply_factory(options: dict[str, str]) -> SupplyFactory`; it validates
the options (raise `ValueError` with a clear message) and returns a factory called once per
simulated link with the two ends' names. `--supply NAME[:KEY=VALUE,...]` on a simulator's command
line picks one (`parse_supply_spec`, `load_supply_factory`).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Protocol

ENTRY_POINT_GROUP = "qkdagent.supplies"
MAX_SPEC = 1024
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


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


SupplyFactory = Callable[[str, str], KeySupply]
"""Called once per simulated link with its two ends' names (sorted)."""


class CsprngSupply:
    """A link producing `rate_bps` secret bits per second into a store of `capacity_bits`,
    the bits drawn from the OS CSPRNG at the moment they are taken."""

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
        """Empty the store down to `keep_bits` (tests: provoke exhaustion without waiting)."""
        self._refill()
        self._level = float(min(self._level, keep_bits))


def parse_supply_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`NAME[:KEY=VALUE,...]` -> (name, options); a ValueError names what is wrong."""
    if len(spec) > MAX_SPEC or not spec.isprintable():
        raise ValueError(f"a supply is NAME[:KEY=VALUE,...] of at most {MAX_SPEC} characters")
    name, _, rest = spec.partition(":")
    if not _NAME.match(name):
        raise ValueError(f"supply name {name!r}: lower-case letters, digits, '-' or '_'")
    options: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not _KEY.match(key):
            raise ValueError(f"supply option {item!r} is not KEY=VALUE")
        if key in options:
            raise ValueError(f"supply option {key!r} given twice")
        options[key] = value
    return name, options


def load_supply_factory(name: str, options: dict[str, str]) -> SupplyFactory:
    """The factory of the installed supply `name` (entry-point group `qkdagent.supplies`)."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
        raise ValueError(
            f"no key supply {name!r} is installed (installed: {', '.join(known) or 'none'}; "
            "the built-in one is the simulators' default)"
        )
    make = found[0].load()
    factory = make(dict(options))
    if not callable(factory):
        raise ValueError(f"key supply {name!r}: its entry point did not return a factory")
    return factory


BUILTIN = "csprng"
"""The simulators' default supply: `CsprngSupply`, set by their own rate flags."""


def prebuilt_supplies(
    spec: str | None, links: Iterable[tuple[str, str]], *, builtin_flags: str = "--rate"
) -> SupplyFactory | None:
    """What a simulator's `--supply spec` names, its supplies made now for every link in
    `links`, so a bad spec or a failing engine is one clear `ValueError` before anything
    listens, never a traceback from inside a server. None for the built-in CSPRNG supply (the
    simulator makes it from `builtin_flags`). A link not made here is made on demand."""
    if spec is None:
        return None
    name, options = parse_supply_spec(spec)
    if name == BUILTIN:
        if options:
            raise ValueError(f"supply {BUILTIN!r} takes no options (it is set by {builtin_flags})")
        return None
    try:
        factory = load_supply_factory(name, options)
    except ValueError as exc:
        raise ValueError(f"--supply {name}: {exc}") from None
    except Exception as exc:  # a broken plugin: one line naming it, not its traceback
        raise ValueError(f"--supply {name}: cannot load it ({type(exc).__name__}: {exc})") from None
    made: dict[tuple[str, str], KeySupply] = {}
    for a, b in links:
        pair = (min(a, b), max(a, b))
        try:
            made[pair] = factory(*pair)
        except Exception as exc:
            raise ValueError(
                f"--supply {name}: no supply for link {pair[0]}-{pair[1]} "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def prebuilt(a: str, b: str) -> KeySupply:
        pair = (min(a, b), max(a, b))
        supply = made.get(pair)
        return supply if supply is not None else factory(*pair)

    return prebuilt
