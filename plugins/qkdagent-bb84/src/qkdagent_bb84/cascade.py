"""Cascade information reconciliation, vectorised over blocks (pure: numpy arrays in and out).

Hand-written, not a library: no maintained Python Cascade exists (the published ones are
teaching code at 0.05-0.2 Mbit/s that walk one block at a time in Python), and what makes this
one fast is specific to how we hold the key: all odd blocks of a pass are bisected *together*,
one numpy step per bisection level, which is also one round trip of the classical channel.

The protocol, both parties simulated here: for each pass Alice and Bob apply the same public
random permutation, cut it into blocks of the pass's size, and Alice discloses every block
parity. A block whose parities differ holds an odd number of errors; a bisection (Alice
discloses the parity of the left half, Bob compares) finds one error, which Bob flips. Flipping
a bit changes the parity of the block holding it in every earlier pass, which may turn an even
block odd (the "cascade"); those are bisected in turn, until every block of every pass so far
agrees. Blocks of one pass are disjoint, so one pass's odd blocks are corrected in one batch;
batches of different passes never run together (they could find the same bit).

Every parity Alice discloses is counted in `disclosed`; `rounds` counts the round trips (one per
batch of block parities and one per bisection level of a batch).

Algorithms (block sizes per pass; Q is the estimated error rate; n the key length):
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
from dataclasses import dataclass, field

import numpy as np

from .finitekey import h

MIN_QBER = 1e-4


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


ALGORITHMS = ("original", "yanetal", "option8")


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


class _Pass:
    """One pass: its permutation (and inverse), block size and per-block parity difference."""

    __slots__ = ("diff", "inv", "k", "perm")

    def __init__(self, perm: np.ndarray, k: int, diff: np.ndarray) -> None:
        self.perm = perm
        self.inv = np.empty_like(perm)
        self.inv[perm] = np.arange(perm.size, dtype=perm.dtype)
        self.k = k
        self.diff = diff


def _range_parities(
    bits: np.ndarray, perm: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Prefix parities over the concatenated permuted ranges [start, end) and each range's
    offset into it: the parity of [a, b) inside range r is P[off_r+b-s_r] ^ P[off_r+a-s_r]."""
    lengths = ends - starts
    offsets = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    total = int(lengths.sum())
    pos = np.arange(total, dtype=np.int64) - np.repeat(offsets - starts, lengths)
    prefix = np.zeros(total + 1, dtype=np.uint8)
    np.bitwise_xor.accumulate(bits[perm[pos]], out=prefix[1:])
    return prefix, offsets


def _bisect(alice: np.ndarray, bob: np.ndarray, p: _Pass, n: int) -> tuple[np.ndarray, int, int]:
    """Bisect every odd block of pass `p` at once; return Bob's positions to flip, parities
    disclosed and round trips."""
    odd = np.flatnonzero(p.diff)
    start = odd.astype(np.int64) * p.k
    end = np.minimum(start + p.k, n)
    a_pre, off = _range_parities(alice, p.perm, start, end)  # Alice answers from her key
    b_pre, _ = _range_parities(bob, p.perm, start, end)  # Bob compares with his
    lo, hi = start.copy(), end.copy()
    disclosed = rounds = 0
    active = np.flatnonzero(hi - lo > 1)
    while active.size:
        left_end, r = lo[active], hi[active]
        mid = (left_end + r) // 2
        base = off[active] - start[active]
        a_par = a_pre[base + mid] ^ a_pre[base + left_end]
        b_par = b_pre[base + mid] ^ b_pre[base + left_end]
        left = a_par != b_par
        hi[active] = np.where(left, mid, r)
        lo[active] = np.where(left, left_end, mid)
        disclosed += active.size
        rounds += 1
        active = active[hi[active] - lo[active] > 1]
    return p.perm[lo], disclosed, rounds


def cascade(
    alice: np.ndarray,
    bob: np.ndarray,
    qber: float,
    rng: np.random.Generator,
    algorithm: str = "yanetal",
) -> CascadeResult:
    """Reconcile Bob's key with Alice's (uint8 arrays of 0/1); `rng` is the public randomness
    both sides share (the permutations)."""
    n = int(alice.size)
    if bob.size != n:
        raise ValueError("keys differ in length")
    bob = bob.astype(np.uint8, copy=True)
    alice = alice.astype(np.uint8, copy=False)
    if n == 0:
        return CascadeResult(bob, 0, 0, 0)
    dtype = np.int32 if n < 2**31 else np.int64
    passes: list[_Pass] = []
    disclosed = rounds = flipped = 0
    for k in block_sizes(algorithm, qber, n):
        perm = rng.permutation(n).astype(dtype, copy=False)
        starts = np.arange(0, n, k)
        a_par = np.bitwise_xor.reduceat(alice[perm], starts)
        b_par = np.bitwise_xor.reduceat(bob[perm], starts)
        passes.append(_Pass(perm, k, a_par ^ b_par))
        disclosed += starts.size
        rounds += 1
        while True:
            todo = next((p for p in passes if p.diff.any()), None)
            if todo is None:
                break
            flips, d, r = _bisect(alice, bob, todo, n)
            disclosed += d
            rounds += r
            flipped += flips.size
            bob[flips] ^= 1
            for p in passes:
                np.bitwise_xor.at(p.diff, p.inv[flips] // p.k, 1)
    return CascadeResult(bob, disclosed, rounds, flipped)
