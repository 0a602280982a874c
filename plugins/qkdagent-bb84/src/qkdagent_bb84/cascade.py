"""Cascade information reconciliation, vectorised over blocks and frames (pure: numpy in and out).

Hand-written, not a library: no maintained Python Cascade exists (the published ones are
teaching code at 0.05-0.2 Mbit/s that walk one block at a time in Python). What makes this one
fast: all odd blocks of a pass, in every frame of a batch, are bisected *together*, one numpy
step per bisection level, which is also one round trip of the classical channel; Alice's
parities come from a prefix sum of her permuted key computed once per pass (her key never
changes), so each of her answers is two lookups; Bob's parities are his prefix sums as the pass
opened corrected by the flips he made since; and the permutations are public, fixed per (n,
pass) and cached, because drawing a random permutation of 10^6 positions costs more than the
rest of a pass. Fixed public permutations are as good as fresh ones: errors are independent
from frame to frame, the permutations were never secret, and every parity is counted anyway;
an adversary who shapes errors to defeat them gains a discarded block, which she can have by
cutting the fibre.

The protocol: for each pass both ends apply the pass's public permutation, cut it into blocks of
the pass's size, and Alice discloses every block parity. A block whose parities differ holds an
odd number of errors; a bisection (Alice discloses the parity of the left half, Bob says which
half he goes on with) finds one error, which Bob flips. Flipping a bit changes the parity of the
block holding it in every earlier pass, which may turn an even block odd (the "cascade"); those
are bisected in turn, until every block of every pass so far agrees. Blocks of one pass are
disjoint, so one pass's odd blocks are corrected in one batch; batches of different passes
never run together (they could find the same bit).

Both ends are simulated, each from its own key and from the messages it receives through the
authenticated `Channel` (nothing else crosses). Every parity Alice discloses is counted, per
frame, in `disclosed`; `rounds` counts the round trips (one per batch of block parities and one
per bisection level of a batch), shared by the frames of a batch.

Algorithms (block sizes per pass; Q is the estimated error rate; n the frame length):
- `original` (Brassard-Salvail 1993): 4 passes, k1 = ceil(0.73/Q), k_i = 2 k_(i-1).
- `yanetal` (Yan et al. 2008, "Cascade opt. (2)" of Martinez-Mateo et al. 2015): 10 passes,
  k1 = ceil(0.8/Q), k2 = 5 k1, then n/2. The default (f about 1.06-1.08).
- `option8` (Martinez-Mateo et al., "Demystifying the information reconciliation protocol
  Cascade", QIC 15 (2015), opt. (8)): 14 passes, a = log2(1/Q) - 0.5, k1 = 2^ceil(a),
  k2 = 2^ceil((a + 12)/2), k3 = 4096, then n/2 (its published f needs sub-block reuse,
  which this implementation does not do: measured f is about 1.11).
"""

from __future__ import annotations

import math
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .channel import (
    ALICE,
    BOB,
    AuthError,
    Messages,
    pack_bits,
    unauthenticated,
    unpack_bits,
)
from .finitekey import h

MIN_QBER = 1e-4
ALGORITHMS = ("original", "yanetal", "option8")
CACHE_BYTES = 256 << 20
_PERM_DOMAIN = 0x63617363  # separates these public permutations from every other seeded stream


def block_sizes(algorithm: str, qber: float, n: int) -> list[int]:
    q = max(qber, MIN_QBER)
    half = max(1, n // 2)
    if algorithm == "original":
        k1 = math.ceil(0.73 / q)
        sizes = [k1, 2 * k1, 4 * k1, 8 * k1]
    elif algorithm == "yanetal":
        k1 = math.ceil(0.8 / q)
        sizes = [k1, 5 * k1] + [half] * 8
    elif algorithm == "option8":
        a = math.log2(1 / q) - 0.5
        sizes = [2 ** math.ceil(a), 2 ** math.ceil((a + 12) / 2), 4096] + [half] * 11
    else:
        raise ValueError(f"unknown Cascade algorithm {algorithm!r}")
    return [max(1, min(k, n)) for k in sizes]


class _PermutationCache:
    """Public permutations (and inverses) by (n, pass), bounded in bytes, thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, n: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        key = (n, index)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        rng = np.random.default_rng((_PERM_DOMAIN, n, index))
        perm = np.arange(n, dtype=np.intp)  # intp: numpy indexes without converting
        rng.shuffle(perm)
        inv = np.empty(n, dtype=np.int32)
        inv[perm] = np.arange(n, dtype=np.int32)
        with self._lock:
            self._items[key] = (perm, inv)
            while len(self._items) > 1 and sum(12 * k[0] for k in self._items) > self.limit:
                self._items.popitem(last=False)
        return perm, inv


PERMUTATIONS = _PermutationCache(CACHE_BYTES)


def warm(n: int, algorithm: str = "yanetal") -> None:
    """Build the public permutations for frames of n bits ahead of the first frame."""
    for index in range(len(block_sizes(algorithm, 0.02, n))):
        PERMUTATIONS.get(n, index)


@dataclass
class CascadeResult:
    key: np.ndarray = field(repr=False)
    """Bob's key after reconciliation (Alice's, unless an even number of errors survived)."""
    disclosed: int
    rounds: int
    flipped: int

    def efficiency(self, n: int, qber: float) -> float:
        """f = disclosed / (n h(Q)); inf when h(Q) = 0."""
        denom = n * h(qber)
        return self.disclosed / denom if denom > 0 else math.inf


@dataclass
class FramesResult:
    """A batch of frames reconciled together: per-frame figures, shared round trips."""

    keys: np.ndarray = field(repr=False)
    disclosed: np.ndarray
    flipped: np.ndarray
    rounds: int


class _Pass:
    """One pass of a batch: permutation, block size, blocks per frame; each end's permuted key
    as it was when the pass opened (Alice's never changes), their prefix parities computed on
    the pass's first bisection, and the positions Bob has flipped since the pass opened."""

    __slots__ = (
        "a_key",
        "a_perm",
        "a_pre",
        "b_key",
        "b_perm",
        "b_pre",
        "diff",
        "flips",
        "have",
        "inv",
        "k",
        "per_frame",
        "perm",
        "sorted_flips",
    )

    def __init__(self, perm: np.ndarray, inv: np.ndarray, k: int, n: int) -> None:
        self.perm, self.inv, self.k = perm, inv, k
        self.per_frame = -(-n // k)
        self.diff: np.ndarray = np.empty(0, dtype=np.uint8)
        self.a_perm = self.b_perm = self.a_key = self.b_key = self.diff
        self.a_pre: np.ndarray | None = None
        self.b_pre: np.ndarray | None = None
        self.flips: list[np.ndarray] = []
        self.have = np.empty(0, dtype=bool)
        self.sorted_flips = np.empty(0, dtype=np.int64)

    def permuted(self, flat: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(frame, position in the frame's permuted order) of flat key positions."""
        frame, pos = np.divmod(flat, n)
        return frame, self.inv[pos]

    def prefixes(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both ends' prefix parities, computed for the rows of `frames` not done yet (late
        passes find odd blocks in a few frames of a batch: the others never need them)."""
        if self.a_pre is None or self.b_pre is None:
            shape = (self.a_key.shape[0], self.a_key.shape[-1] + 1)
            self.a_pre, self.b_pre = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
            self.have = np.zeros(shape[0], dtype=bool)
        rows = np.unique(frames)
        rows = rows[~self.have[rows]]
        if rows.size:
            for pre, permuted, key in (
                (self.a_pre, self.a_perm, self.a_key),
                (self.b_pre, self.b_perm, self.b_key),
            ):
                if permuted.size:
                    pre[rows, 1:] = _prefix(permuted[rows])
                else:  # a pass of two blocks: its permuted rows made only now, only these
                    pre[rows, 1:] = _prefix(np.take(key[rows], self.perm, axis=1))
            self.have[rows] = True
        return self.a_pre, self.b_pre

    def bob_flips(self, n: int) -> np.ndarray:
        """Sorted flat permuted positions Bob flipped since the pass opened."""
        if self.flips:
            new = np.sort(np.concatenate(self.flips))
            at = np.searchsorted(self.sorted_flips, new)
            self.sorted_flips, self.flips = np.insert(self.sorted_flips, at, new), []
        return self.sorted_flips


_ONES = np.uint64(0x0101010101010101)


def _prefix(bits: np.ndarray) -> np.ndarray:
    """Row-wise inclusive prefix parities of 0/1 bytes (pre[b] ^ pre[a] with a leading 0 is
    the parity of [a, b)), eight bytes per 64-bit word: a prefix XOR inside each word by three
    shifts, the words' own parities accumulated (one element per word, not per bit), then
    broadcast back into every byte. Eight times fewer elements through numpy's scalar
    accumulate loop, which is what made this the costliest step of a pass."""
    rows, n = bits.shape
    words = -(-n // 8)
    buf = np.zeros((rows, words * 8), dtype=np.uint8)
    buf[:, :n] = bits
    w = buf.view(np.uint64)
    w ^= w << np.uint64(8)
    w ^= w << np.uint64(16)
    w ^= w << np.uint64(32)  # byte j of a word: parity of its bytes 0..j; byte 7: the word's
    carry = w >> np.uint64(56)
    np.bitwise_xor.accumulate(carry, axis=1, out=carry)
    w[:, 1:] ^= carry[:, :-1] * _ONES  # parity of every earlier word into every byte
    return buf[:, :n]


def _open_pass(
    p: _Pass, alice: np.ndarray, bob: np.ndarray, channel: Messages, frames: int, n: int
) -> None:
    """Alice discloses every block parity of pass `p`; Bob learns which blocks disagree.

    Each end keeps its key as the pass opened (Alice's never changes; Bob's is copied) and, for
    passes of many blocks, its permuted copy. A pass of at most two blocks (the late passes of
    `yanetal`, `option8`) needs neither up front: block 0's parity from the first half of the
    permutation, block 1's from the frame's total parity, and permuted rows only for the
    frames its bisections visit."""
    p.a_key, p.b_key = alice, bob.copy()
    if p.per_frame <= 2:
        a_par, b_par = (_two_blocks(key, p.perm[: p.k], p.per_frame) for key in (alice, bob))
    else:
        starts = np.arange(0, n, p.k)
        p.a_perm = np.take(alice, p.perm, axis=1)
        p.b_perm = np.take(bob, p.perm, axis=1)
        a_par, b_par = (np.bitwise_xor.reduceat(x, starts, axis=1) for x in (p.a_perm, p.b_perm))
    received = channel.send(ALICE, "cascade.parities", pack_bits(a_par.ravel()))
    p.diff = unpack_bits(received, frames * p.per_frame, "parities") ^ b_par.ravel()


def _two_blocks(key: np.ndarray, first: np.ndarray, blocks: int) -> np.ndarray:
    """Parities of a pass's one or two blocks per frame: (frames, blocks)."""
    head = (np.count_nonzero(np.take(key, first, axis=1), axis=1) & 1).astype(np.uint8)
    if blocks == 1:
        return head[:, None]
    total = (np.count_nonzero(key, axis=1) & 1).astype(np.uint8)
    return np.stack([head, head ^ total], axis=1)


def _ranges(p: _Pass, blocks: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frame, j = np.divmod(blocks.astype(np.int64), p.per_frame)
    start = j * p.k
    return frame, start, np.minimum(start + p.k, n)


def _bisect(
    p: _Pass, index: int, channel: Messages, frames: int, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Bisect every odd block of pass `p` (all frames) at once. Returns the flat positions Bob
    flips, their frames, the parities disclosed per odd block, and the round trips."""
    odd = np.flatnonzero(p.diff).astype(np.int32)
    request = channel.send(BOB, "cascade.bisect", struct.pack("<H", index) + odd.tobytes())
    # Alice: which pass and blocks Bob asks about (checked: a bad request aborts the block)
    (asked_pass,) = struct.unpack_from("<H", request)
    asked = np.frombuffer(request, dtype=np.int32, offset=2)
    if (
        asked_pass != index
        or asked.size != odd.size
        or (asked.size and not 0 <= int(asked.min()) <= int(asked.max()) < p.diff.size)
    ):
        raise AuthError("malformed bisection request")
    # Bob: his parities as the pass opened, corrected by his flips since (sorted positions)
    flipped = p.bob_flips(n)
    frame, start, end = _ranges(p, odd, n)
    a_frame, a_start, a_end = _ranges(p, asked, n)
    a_pre, _ = p.prefixes(a_frame)  # Alice's rows, for the frames she was asked about
    _, b_pre = p.prefixes(frame)
    a_flat, b_flat = a_pre.reshape(-1), b_pre.reshape(-1)
    base = frame * (n + 1)
    a_base = a_frame * (n + 1)
    lo, hi = start.copy(), end.copy()  # Bob's search state
    a_lo, a_hi = a_start.copy(), a_end.copy()  # Alice's, moved only by Bob's messages
    steps = np.zeros(odd.size, dtype=np.int64)
    rounds = 0
    active = np.flatnonzero(hi - lo > 1)
    while active.size:
        # Alice: parity of the left half of each range still open
        al, ah = a_lo[active], a_hi[active]
        am = (al + ah) // 2
        ab = a_base[active]
        a_par = a_flat[ab + am] ^ a_flat[ab + al]
        answer = channel.send(ALICE, "cascade.answer", pack_bits(a_par))
        # Bob: compare with his own, keep the half whose parities differ, tell Alice
        left_end, right_end = lo[active], hi[active]
        mid = (left_end + right_end) // 2
        bb = base[active]
        b_par = b_flat[bb + mid] ^ b_flat[bb + left_end]
        if flipped.size:
            fo = frame[active] * n
            count = np.searchsorted(flipped, fo + mid) - np.searchsorted(flipped, fo + left_end)
            b_par ^= (count & 1).astype(np.uint8)
        left = unpack_bits(answer, active.size, "answer") != b_par
        hi[active] = np.where(left, mid, right_end)
        lo[active] = np.where(left, left_end, mid)
        steps[active] += 1
        rounds += 1
        told = unpack_bits(
            channel.send(BOB, "cascade.direction", pack_bits(left)), active.size, "dir"
        )
        a_hi[active] = np.where(told, am, ah)
        a_lo[active] = np.where(told, al, am)
        active = active[hi[active] - lo[active] > 1]
    return frame * n + p.perm[lo], frame, steps, rounds


def cascade_frames(
    alice: np.ndarray,
    bob: np.ndarray,
    qber: float,
    algorithm: str = "yanetal",
    channel: Messages | None = None,
) -> FramesResult:
    """Reconcile Bob's frames with Alice's (uint8 0/1 arrays of shape (frames, n)), all frames
    in the same round trips."""
    if alice.shape != bob.shape or alice.ndim != 2:
        raise ValueError("keys differ in shape (or are not frames x bits)")
    frames, n = alice.shape
    channel = channel if channel is not None else unauthenticated()
    bob = bob.astype(np.uint8, copy=True)
    alice = alice.astype(np.uint8, copy=False)
    disclosed = np.zeros(frames, dtype=np.int64)
    flipped = np.zeros(frames, dtype=np.int64)
    if n == 0 or frames == 0:
        return FramesResult(bob, disclosed, flipped, 0)
    passes: list[_Pass] = []
    rounds = 0
    for index, k in enumerate(block_sizes(algorithm, qber, n)):
        p = _Pass(*PERMUTATIONS.get(n, index), k, n)
        _open_pass(p, alice, bob, channel, frames, n)
        passes.append(p)
        disclosed += p.per_frame
        rounds += 1
        while True:
            todo = next((i for i, q in enumerate(passes) if q.diff.any()), None)
            if todo is None:
                break
            flips, frame_of, steps, r = _bisect(passes[todo], todo, channel, frames, n)
            rounds += r
            disclosed += np.bincount(frame_of, weights=steps, minlength=frames).astype(np.int64)
            flipped += np.bincount(frame_of, minlength=frames)
            bob.reshape(-1)[flips] ^= 1
            for q in passes:
                fr, pos = q.permuted(flips, n)
                np.bitwise_xor.at(q.diff, fr * q.per_frame + pos // q.k, 1)
                q.flips.append(fr * n + pos)
    return FramesResult(bob, disclosed, flipped, rounds)


def cascade(
    alice: np.ndarray,
    bob: np.ndarray,
    qber: float,
    algorithm: str = "yanetal",
    channel: Messages | None = None,
) -> CascadeResult:
    """Reconcile one frame: Bob's key with Alice's (uint8 arrays of 0/1)."""
    if bob.size != alice.size:
        raise ValueError("keys differ in length")
    r = cascade_frames(alice.reshape(1, -1), bob.reshape(1, -1), qber, algorithm, channel)
    return CascadeResult(r.keys.reshape(-1), int(r.disclosed[0]), r.rounds, int(r.flipped[0]))
