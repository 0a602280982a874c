"""One BB84 block end to end: quantum phase, sifting, estimation, Cascade, verification, PA.

Pure given its seed: `run_block(settings, seed)` returns both ends' final keys (or an abort
with the estimate that caused it) and every figure of the block. Both parties are simulated in
one call; what one party learns from the other is only what the protocol discloses (bases,
the test-basis bits, parities, the verification tag, public hash seeds), all of it counted.
Randomness is split into Alice's, Bob's/the channel's and the public stream so a test can fix
one and vary another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .cascade import cascade
from .finitekey import decoy_bounds, lim_length, tomamichel_length
from .hashing import toeplitz_hash, verification_tag
from .physics import KEY_BASIS, TEST_BASIS, Detections, Physics, simulate

OK = "ok"
ABORT_QBER = "abort: qber above threshold"
ABORT_VERIFY = "abort: verification failed"
ABORT_LENGTH = "abort: no secret key left"


@dataclass(frozen=True)
class Settings:
    """Everything a block depends on besides its seed."""

    physics: Physics = field(default_factory=Physics)
    block_bits: int = 10_000
    """Sifted key-basis bits to gather before post-processing (the finite-key n)."""
    chunk_pulses: int = 1 << 20
    max_pulses: int = 1 << 32
    qber_threshold: float = 0.11
    cascade: str = "yanetal"
    verify_bits: int = 64
    eps_sec: float = 1e-10
    eps_cor: float = 1e-15
    auth_bits: int = 0
    """Authentication key consumed per block (0 with an HMAC keyed from a configured secret)."""


@dataclass
class Sifted:
    key_alice: np.ndarray = field(repr=False)
    key_bob: np.ndarray = field(repr=False)
    key_cls: np.ndarray
    test_cls: np.ndarray
    test_err: np.ndarray


def sift(det: Detections) -> Sifted:
    """Keep pulses both measured in the same basis; split into key and (disclosed) test bits."""
    same = det.a_basis == det.b_basis
    key = same & (det.a_basis == KEY_BASIS)
    test = same & (det.a_basis == TEST_BASIS)
    return Sifted(
        det.a_bit[key],
        det.b_bit[key],
        det.cls[key],
        det.cls[test],
        (det.a_bit[test] != det.b_bit[test]).astype(np.uint8),
    )


@dataclass(frozen=True)
class Estimate:
    qber: float
    """Error rate on the disclosed test-basis bits (all intensities)."""
    sample: int
    signal_qber: float


def estimate(s: Sifted) -> Estimate:
    k = int(s.test_err.size)
    if k == 0:
        return Estimate(0.5, 0, 0.5)
    sig = s.test_cls == 0
    sig_q = float(s.test_err[sig].mean()) if sig.any() else 0.5
    return Estimate(float(s.test_err.mean()), k, sig_q)


@dataclass
class BlockResult:
    status: str
    pulses: int = 0
    sifted: int = 0
    sample: int = 0
    qber_estimate: float = 0.5
    qber_actual: float = 0.5
    """The true error rate of the sifted key (known to the simulator only)."""
    disclosed: int = 0
    rounds: int = 0
    f: float = 0.0
    key_bits: int = 0
    s1: float = 0.0
    phi: float = 0.5
    seconds: dict[str, float] = field(default_factory=dict)
    alice_key: bytes = field(default=b"", repr=False)
    bob_key: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        return self.status == OK


def gather(settings: Settings, rng: np.random.Generator) -> Detections:
    """Run the quantum phase chunk by chunk until `block_bits` key-basis bits are sifted."""
    parts: list[Detections] = []
    have = pulses = 0
    while have < settings.block_bits and pulses < settings.max_pulses:
        d = simulate(settings.physics, settings.chunk_pulses, rng)
        parts.append(d)
        pulses += d.pulses
        have += int(np.count_nonzero((d.a_basis == d.b_basis) & (d.a_basis == KEY_BASIS)))
    return Detections.concat(parts)


def key_length(settings: Settings, s: Sifted, est: Estimate, leak: int) -> tuple[int, float, float]:
    """Finite-key length: Lim et al. 2014 with decoys, Tomamichel et al. 2012 without."""
    n = int(s.key_alice.size)
    if settings.physics.decoys:
        b = decoy_bounds(
            np.bincount(s.key_cls, minlength=3).tolist(),
            np.bincount(s.test_cls, minlength=3).tolist(),
            np.bincount(s.test_cls, weights=s.test_err, minlength=3).tolist(),
            settings.physics.intensities,
            settings.physics.class_probabilities,
            settings.eps_sec,
        )
        return lim_length(b, leak, settings.eps_sec, settings.eps_cor), b.s1, b.phi
    ell = tomamichel_length(n, est.sample, est.qber, leak, settings.eps_sec, settings.eps_cor)
    return ell, float(n), est.qber


def post_process(settings: Settings, s: Sifted, rng: np.random.Generator) -> BlockResult:
    """Everything after the quantum phase; `rng` is the public randomness."""
    clock = time.perf_counter
    t0 = clock()
    n = int(s.key_alice.size)
    est = estimate(s)
    actual = float(np.mean(s.key_alice != s.key_bob)) if n else 0.5
    result = BlockResult(
        ABORT_QBER, sifted=n, sample=est.sample, qber_estimate=est.qber, qber_actual=actual
    )
    if est.sample == 0 or est.qber > settings.qber_threshold or n == 0:
        return result
    t1 = clock()
    rec = cascade(s.key_alice, s.key_bob, est.qber, rng, settings.cascade)
    t2 = clock()
    result.disclosed, result.rounds = rec.disclosed, rec.rounds + 1
    result.f = rec.efficiency(n, actual) if actual > 0 else 0.0
    tag_seed = int(rng.integers(0, 2**63))  # public, drawn after reconciliation
    tag_a = verification_tag(s.key_alice, np.random.default_rng(tag_seed), settings.verify_bits)
    tag_b = verification_tag(rec.key, np.random.default_rng(tag_seed), settings.verify_bits)
    t3 = clock()
    result.seconds = {"estimate": t1 - t0, "cascade": t2 - t1, "verify": t3 - t2}
    if not np.array_equal(tag_a, tag_b):
        result.status = ABORT_VERIFY
        return result
    leak = rec.disclosed + settings.verify_bits + settings.auth_bits
    ell, result.s1, result.phi = key_length(settings, s, est, leak)
    ell -= ell % 8
    if ell <= 0:
        result.status = ABORT_LENGTH
        return result
    seed = rng.integers(0, 2, n + ell - 1, dtype=np.uint8)
    result.alice_key = np.packbits(toeplitz_hash(s.key_alice, seed, ell)).tobytes()
    result.bob_key = np.packbits(toeplitz_hash(rec.key, seed, ell)).tobytes()
    result.seconds["pa"] = clock() - t3
    result.key_bits = ell
    result.status = OK
    return result


def run_block(settings: Settings, seed: int | tuple[int, ...]) -> BlockResult:
    """One block from seed to keys; the same seed gives the same block."""
    seq = np.random.SeedSequence(seed)
    quantum, public = (np.random.default_rng(s) for s in seq.spawn(2))
    t = time.perf_counter()
    det = gather(settings, quantum)
    t_q = time.perf_counter() - t
    result = post_process(settings, sift(det), public)
    result.pulses = det.pulses
    result.seconds["quantum"] = t_q
    return result
