"""One BB84 block end to end: quantum phase, sifting, estimation, Cascade, verification, PA.

Pure given its seed: `run_block(settings, seed)` returns both ends' final keys (or an abort
with the estimate that caused it) and every figure of the block. Both parties are simulated in
one call; what one party learns from the other is only what the protocol discloses (bases,
the test-basis bits, parities, the verification tag, public hash seeds), all of it counted.
Randomness is split into Alice's, Bob's/the channel's and the public stream so a test can fix
one and vary another.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from .cascade import cascade
from .channel import (
    ALICE,
    BOB,
    AuthError,
    Channel,
    ChannelError,
    Messages,
    Tamper,
    pack_bits,
    unpack_bits,
)
from .finitekey import decoy_bounds, lim_length, tomamichel_length
from .frames import BlockStart, encode_block_start
from .hashing import toeplitz_hash, verification_tag
from .netend import NetEnd
from .physics import KEY_BASIS, TEST_BASIS, Detections, Physics, simulate

OK = "ok"
ABORT_QBER = "abort: qber above threshold"
ABORT_VERIFY = "abort: verification failed"
ABORT_LENGTH = "abort: no secret key left"
ABORT_AUTH = "abort: classical message failed authentication"
ABORT_CHANNEL = "abort: classical channel failed"


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
    """QKD key consumed by authentication per block: 0, the channel's HMAC is keyed from a
    configured secret (see `channel.py`)."""


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
    messages: dict[str, int] = field(default_factory=dict)
    """Classical messages of the block, per kind."""
    detail: str = ""
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


def _exchange_sifting(det: Detections, channel: Messages, limit: int) -> Sifted:
    """Sifting and the disclosed sample over the channel, each end from what it received.

    Bob announces his bases for the pulses he detected; Alice answers which match and each
    pulse's intensity class; both keep the key-basis matches (the first `limit` of them: a
    fixed frame length) and disclose their test-basis bits to each other."""
    announced = channel.send(BOB, "sift.bases", pack_bits(det.b_basis))
    count = det.cls.size
    b_basis_at_alice = unpack_bits(announced, count, "bases")
    same = det.a_basis == b_basis_at_alice
    key_a = same & (det.a_basis == KEY_BASIS)
    test_a = same & (det.a_basis == TEST_BASIS)
    reply = channel.send(
        ALICE, "sift.match", pack_bits(key_a) + pack_bits(test_a) + det.cls.tobytes()
    )
    size = (count + 7) // 8
    if len(reply) != 2 * size + count:
        raise AuthError("malformed sifting reply")
    key_b = unpack_bits(reply[:size], count, "match").astype(bool)
    test_b = unpack_bits(reply[size : 2 * size], count, "match").astype(bool)
    cls = np.frombuffer(reply, dtype=np.uint8, offset=2 * size)
    a_key, b_key = det.a_bit[key_a][:limit], det.b_bit[key_b][:limit]
    if not channel.knows(ALICE):  # Bob's process: Alice's values are placeholders, never used
        a_key = np.zeros_like(b_key)
    a_test = det.a_bit[test_a]
    b_test = det.b_bit[test_b]
    from_alice = unpack_bits(
        channel.send(ALICE, "sample.alice", pack_bits(a_test)), b_test.size, "sample"
    )
    from_bob = unpack_bits(
        channel.send(BOB, "sample.bob", pack_bits(b_test)),
        a_test.size if channel.knows(ALICE) else b_test.size,
        "sample",
    )
    if channel.knows(ALICE) and not np.array_equal(from_alice ^ b_test, from_bob ^ a_test):
        raise AuthError("the two ends disagree on the disclosed sample")
    return Sifted(a_key, b_key, cls[key_b][:limit], cls[test_b], from_alice ^ b_test)


def post_process(
    settings: Settings, det: Detections, rng: np.random.Generator, channel: Messages
) -> BlockResult:
    """Everything after the quantum phase; `rng` is Alice's public randomness (hash seeds),
    every message goes through the authenticated `channel`. A message that fails
    authentication aborts the block with no key."""
    try:
        return _post_process(settings, det, rng, channel)
    except AuthError as exc:
        return BlockResult(ABORT_AUTH, detail=str(exc))
    except ChannelError as exc:
        return BlockResult(ABORT_CHANNEL, detail=str(exc))


def _post_process(
    settings: Settings, det: Detections, rng: np.random.Generator, channel: Messages
) -> BlockResult:
    clock = time.perf_counter
    t0 = clock()
    s = _exchange_sifting(det, channel, settings.block_bits)
    n = int(s.key_alice.size)
    est = estimate(s)
    both = channel.knows(ALICE) and channel.knows(BOB)
    actual = float(np.mean(s.key_alice != s.key_bob)) if n and both else math.nan
    result = BlockResult(
        ABORT_QBER, sifted=n, sample=est.sample, qber_estimate=est.qber, qber_actual=actual
    )
    if est.sample == 0 or est.qber > settings.qber_threshold or n == 0:
        return result
    t1 = clock()
    rec = cascade(s.key_alice, s.key_bob, est.qber, settings.cascade, channel)
    t2 = clock()
    result.disclosed, result.rounds = rec.disclosed, rec.rounds + 1
    truth = actual if both else est.qber  # Bob's process: the estimate, all he knows
    result.f = rec.efficiency(n, truth) if truth > 0 else 0.0
    # verification: Alice draws a fresh public seed after reconciliation and sends seed + tag
    tag_seed = int(rng.integers(0, 2**63))
    tag_a = verification_tag(s.key_alice, np.random.default_rng(tag_seed), settings.verify_bits)
    message = channel.send(ALICE, "verify.tag", struct.pack("<Q", tag_seed) + pack_bits(tag_a))
    if len(message) < 8:
        raise AuthError("malformed verification tag")
    (seed_b,) = struct.unpack_from("<Q", message)
    tag_b = verification_tag(rec.key, np.random.default_rng(seed_b), settings.verify_bits)
    same = pack_bits(tag_b) == message[8:]
    verdict = channel.send(BOB, "verify.result", b"\x01" if same else b"\x00")
    t3 = clock()
    result.seconds = {"sift+estimate": t1 - t0, "cascade": t2 - t1, "verify": t3 - t2}
    if verdict != b"\x01" or not same:
        result.status = ABORT_VERIFY
        return result
    leak = rec.disclosed + settings.verify_bits + settings.auth_bits
    ell, result.s1, result.phi = key_length(settings, s, est, leak)
    ell -= ell % 8
    if ell <= 0:
        result.status = ABORT_LENGTH
        return result
    pa_seed = int(rng.integers(0, 2**63))
    message = channel.send(ALICE, "pa.seed", struct.pack("<QI", pa_seed, ell))
    if len(message) != 12:
        raise AuthError("malformed privacy-amplification seed")
    seed_b, ell_b = struct.unpack("<QI", message)
    if ell_b != ell:  # Bob computes the length from the same public figures
        raise AuthError("the two ends disagree on the key length")
    seed_bits = np.random.default_rng(pa_seed).integers(0, 2, n + ell - 1, dtype=np.uint8)
    seed_bits_b = np.random.default_rng(seed_b).integers(0, 2, n + ell - 1, dtype=np.uint8)
    result.alice_key = np.packbits(toeplitz_hash(s.key_alice, seed_bits, ell)).tobytes()
    result.bob_key = np.packbits(toeplitz_hash(rec.key, seed_bits_b, ell)).tobytes()
    result.seconds["pa"] = clock() - t3
    result.key_bits = ell
    result.status = OK
    return result


def run_block(
    settings: Settings,
    seed: int | tuple[int, ...],
    auth_key: bytes | tuple[bytes, bytes] | None = None,
    tamper: Tamper | None = None,
) -> BlockResult:
    """One block from seed to keys; the same seed gives the same block. `auth_key` keys the
    classical channel's HMAC (a fresh random one when None; a pair: Alice's copy and Bob's, which
    must agree or every message fails authentication); `tamper` is the tests' man in the
    middle."""
    seq = np.random.SeedSequence(seed)
    quantum, public = (np.random.default_rng(s) for s in seq.spawn(2))
    t = time.perf_counter()
    det = gather(settings, quantum)
    t_q = time.perf_counter() - t
    if auth_key is None:
        auth_key = secrets.token_bytes(32)
    if isinstance(auth_key, bytes):
        auth_key = (auth_key, auth_key)
    channel = Channel(auth_key[0], auth_key[1], tamper)
    result = post_process(settings, det, public, channel)
    result.messages = dict(channel.sent)
    result.pulses = det.pulses
    result.seconds["quantum"] = t_q
    return result


def fingerprint(settings: Settings, key_size: int) -> bytes:
    """What both processes must agree on (every length and bound depends on it)."""
    return hashlib.sha256(f"{settings!r}\0{key_size}".encode()).digest()[:16]


def _finish(result: BlockResult, det: Detections, end: NetEnd, seconds: float) -> BlockResult:
    result.messages = dict(end.sent)
    result.pulses = det.pulses
    result.seconds["quantum"] = seconds
    return result


def run_alice(
    settings: Settings, seed: int | tuple[int, ...], end: NetEnd, block_id: str, print_: bytes
) -> BlockResult:
    """Alice's end of a block with Bob in another process: simulate the quantum phase (both
    ends' detections, seeded), send Bob his detection record in `block.start` (the stand-in for
    the quantum channel), then post-process over `end`."""
    seq = np.random.SeedSequence(seed)
    quantum, public = (np.random.default_rng(s) for s in seq.spawn(2))
    t = time.perf_counter()
    det = gather(settings, quantum)
    t_q = time.perf_counter() - t
    start = BlockStart(
        block_id, print_, det.pulses, det.cls.size, pack_bits(det.b_basis), pack_bits(det.b_bit)
    )
    try:
        end.send(ALICE, "block.start", encode_block_start(start))
    except ChannelError as exc:
        return _finish(BlockResult(ABORT_CHANNEL, detail=str(exc)), det, end, t_q)
    return _finish(post_process(settings, det, public, end), det, end, t_q)


def bob_detections(start: BlockStart) -> Detections:
    """Bob's view of the quantum phase: his bases and bits; Alice's values are placeholders."""
    count = start.count
    zeros = np.zeros(count, dtype=np.uint8)
    return Detections(
        cls=zeros,
        a_bit=zeros,
        a_basis=zeros,
        b_basis=unpack_bits(start.b_basis, count, "record"),
        b_bit=unpack_bits(start.b_bit, count, "record"),
        sent=np.zeros(3, dtype=np.int64),
        pulses=start.pulses,
    )


def run_bob(settings: Settings, start: BlockStart, end: NetEnd) -> BlockResult:
    """Bob's end of a block whose `block.start` (already authenticated) is `start`."""
    det = bob_detections(start)
    # Alice's public randomness is hers: Bob's draws are placeholders replaced by her messages
    return _finish(post_process(settings, det, np.random.default_rng(0), end), det, end, 0.0)
