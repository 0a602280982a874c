"""Key supply for the simulators (`kme-sim`, `qkdm-sim` `--supply bb84:...`): a BB84 link.

`make_supply_factory(options)` is the entry point (group `qkdagent.supplies`): it validates the
`--supply` options and returns a factory that makes one `Bb84Supply` per simulated link. A
supply runs BB84 blocks (both ends in this process) in a daemon thread into a bounded store;
`take()` never waits for a block, it only pops stored bits (or raises `SupplyExhausted`). A block
that aborts adds nothing. The store fills at the simulated link's rate: a block's key becomes
available once the link, sending `pulse_rate_hz` pulses per second, would have sent its pulses
(or when the CPU has computed it, if that is later).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from qkdagent import SupplyExhausted, SupplyFactory

from .cascade import ALGORITHMS, warm
from .engine import BlockResult, Settings, run_block
from .physics import Physics

_FLOATS: dict[str, tuple[float, float, float]] = {
    # name: (default, min, max)
    "distance_km": (25.0, 0.0, 1000.0),
    "mu": (0.5, 0.001, 10.0),
    "decoy_mu": (0.1, 0.0, 10.0),
    "p_signal": (0.6, 0.01, 1.0),
    "p_decoy": (0.25, 0.0, 0.99),
    "p_key_basis": (0.7, 0.01, 0.99),
    "fibre_loss_db_km": (0.2, 0.0, 10.0),
    "detector_efficiency": (0.2, 0.001, 1.0),
    "dark_count": (1e-6, 0.0, 0.1),
    "misalignment": (0.01, 0.0, 0.5),
    "eve_intercept": (0.0, 0.0, 1.0),
    "qber_threshold": (0.11, 0.001, 0.25),
    "eps_sec": (1e-10, 1e-30, 0.1),
    "eps_cor": (1e-15, 1e-30, 0.1),
    "pulse_rate_hz": (1e9, 1.0, 1e11),
}
_INTS: dict[str, tuple[int, int, int]] = {
    "block_bits": (1_000_000, 1_000, 4_000_000),
    "capacity_bits": (8_000_000, 8, 1 << 34),
    "seed": (-1, -1, 2**63 - 1),
}
_BOOLS = {"decoys": True, "eve_pns": False}
_PHYSICS = {f for f in Physics.__dataclass_fields__}
KNOWN = sorted([*_FLOATS, *_INTS, *_BOOLS, "cascade"])


def _float(options: dict[str, str], key: str) -> float:
    default, lo, hi = _FLOATS[key]
    if key not in options:
        return default
    try:
        value = float(options[key])
    except ValueError:
        raise ValueError(f"bb84 supply option {key}: not a number") from None
    if not lo <= value <= hi:  # also refuses nan
        raise ValueError(f"bb84 supply option {key}: must be between {lo:g} and {hi:g}")
    return value


def _int(options: dict[str, str], key: str) -> int:
    default, lo, hi = _INTS[key]
    if key not in options:
        return default
    text = options[key]
    if not (text.isascii() and text.lstrip("-").isdigit()) or len(text) > 20:
        raise ValueError(f"bb84 supply option {key}: not an integer")
    value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"bb84 supply option {key}: must be between {lo} and {hi}")
    return value


def _bool(options: dict[str, str], key: str) -> bool:
    if key not in options:
        return _BOOLS[key]
    text = options[key].lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"bb84 supply option {key}: true or false")


def parse_options(options: dict[str, str]) -> tuple[Settings, int, float, int | None]:
    """(settings, capacity in bits, pulse rate, seed or None) from `--supply bb84:K=V,...`."""
    unknown = sorted(set(options) - set(KNOWN))
    if unknown:
        raise ValueError(f"unknown bb84 supply option {unknown[0]!r} (known: {', '.join(KNOWN)})")
    physics = {k: _float(options, k) for k in _FLOATS if k in _PHYSICS}
    physics.update({k: _bool(options, k) for k in _BOOLS})
    try:
        phys = Physics(**physics)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"bb84 supply: {exc}") from None
    algorithm = options.get("cascade", "yanetal")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"bb84 supply option cascade: one of {', '.join(ALGORITHMS)}")
    settings = Settings(
        physics=phys,
        block_bits=_int(options, "block_bits"),
        qber_threshold=_float(options, "qber_threshold"),
        cascade=algorithm,
        eps_sec=_float(options, "eps_sec"),
        eps_cor=_float(options, "eps_cor"),
    )
    seed = _int(options, "seed")
    return (
        settings,
        _int(options, "capacity_bits"),
        _float(options, "pulse_rate_hz"),
        (None if seed < 0 else seed),
    )


class Bb84Supply:
    """One simulated link's key store, refilled by BB84 blocks in a daemon thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        capacity_bits: int,
        pulse_rate_hz: float,
        seed: int,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.capacity_bits = capacity_bits
        self.pulse_rate_hz = pulse_rate_hz
        self._seed = seed
        self._auth_key = secrets.token_bytes(32)
        self._clock = clock
        self._store: deque[bytes] = deque()
        self._pending: deque[tuple[float, bytes]] = deque()  # computed, not yet "sent"
        self._level = 0
        self._head = 0  # bytes already taken from the store's first piece
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._link_clock = clock()
        self._next_block = 0
        self.blocks = self.aborted = self.key_bits = 0
        self.last: BlockResult | None = None
        self._thread: threading.Thread | None = None
        self._background = background

    def __repr__(self) -> str:
        return f"Bb84Supply(level={self._level}, blocks={self.blocks}, aborted={self.aborted})"

    def _release(self) -> None:
        """Move computed blocks whose pulses the link would have sent by now into the store."""
        now = self._clock()
        while self._pending and self._pending[0][0] <= now:
            _, key = self._pending.popleft()
            self._store.append(key)
            self._level += 8 * len(key)

    def _ensure_running(self) -> None:
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bb84-supply", daemon=True)
            self._thread.start()

    def available_bits(self) -> int:
        self._ensure_running()
        with self._lock:
            self._release()
            return self._level

    def take(self, bits: int) -> bytes:
        if bits < 0 or bits % 8:
            raise ValueError("bits must be a non-negative multiple of 8")
        self._ensure_running()
        with self._lock:
            self._release()
            if bits > self._level:
                raise SupplyExhausted(f"{bits} bits requested, {self._level} stored")
            out = bytearray()
            need = bits // 8
            while need:
                piece = self._store[0]
                chunk = piece[self._head : self._head + need]
                out += chunk
                need -= len(chunk)
                self._head += len(chunk)
                if self._head == len(piece):
                    self._store.popleft()
                    self._head = 0
            self._level -= bits
            return bytes(out)

    def produce_once(self) -> BlockResult:
        """Run one block (blocking) and queue its key if verified; both ends' keys must agree."""
        number = self._next_block
        self._next_block += 1
        result = run_block(self.settings, (self._seed, number), self._auth_key)
        with self._lock:
            self.blocks += 1
            self.last = result
            start = max(self._link_clock, self._clock() - result.pulses / self.pulse_rate_hz)
            self._link_clock = start + result.pulses / self.pulse_rate_hz
            if not result.ok or result.alice_key != result.bob_key:
                self.aborted += 1
            else:
                self.key_bits += result.key_bits
                self._pending.append((self._link_clock, result.alice_key))
            self._release()
        return result

    def _full(self) -> bool:
        with self._lock:
            queued = sum(8 * len(k) for _, k in self._pending)
            return self._level + queued >= self.capacity_bits

    def _run(self) -> None:
        warm(self.settings.block_bits, self.settings.cascade)
        while not self._stop.is_set():
            if self._full():
                self._stop.wait(0.05)
                continue
            self.produce_once()

    def close(self) -> None:
        self._stop.set()


def make_supply_factory(options: dict[str, str]) -> SupplyFactory:
    """Entry point `qkdagent.supplies:bb84`: validate options, return the per-link factory."""
    settings, capacity, rate, seed = parse_options(options)

    def factory(end_a: str, end_b: str) -> Bb84Supply:
        if seed is None:
            link_seed = secrets.randbits(63)
        else:  # reproducible, but a different link for each pair of ends
            digest = hashlib.sha256(f"{seed}\0{end_a}\0{end_b}".encode()).digest()
            link_seed = int.from_bytes(digest[:8], "big") >> 1
        return Bb84Supply(settings, capacity_bits=capacity, pulse_rate_hz=rate, seed=link_seed)

    return factory
