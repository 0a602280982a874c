"""Toeplitz hashing over GF(2) with an FFT: verification tags and privacy amplification.

A Toeplitz matrix T (m x n) is fixed by n + m - 1 seed bits s: T[i, j] = s[i - j + n - 1]. The
family {T} is universal (collision probability 2^-m), so it serves both as the verification
hash (m = 64, a fresh public seed per block) and as the privacy-amplification extractor
(leftover hash lemma). y = T x is a slice of the integer convolution s * x taken mod 2, computed
with a real FFT in O((n + m) log(n + m)); the integer sums stay below 2^24 for any block we
allow, far inside float64's exact range, and are rounded before the mod.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 1 << 24


def toeplitz_hash(bits: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """Return the m-bit Toeplitz hash (uint8 0/1 array) of `bits` under `seed` (n + m - 1 bits)."""
    n = int(bits.size)
    if m <= 0 or n == 0:
        return np.zeros(max(m, 0), dtype=np.uint8)
    if seed.size != n + m - 1:
        raise ValueError("Toeplitz seed must have n + m - 1 bits")
    if n > MAX_BITS:
        raise ValueError("block too long for exact FFT hashing")
    size = _fast_length(n + seed.size - 1)
    conv = np.fft.irfft(
        np.fft.rfft(seed.astype(np.float64), size) * np.fft.rfft(bits.astype(np.float64), size),
        size,
    )
    window = conv[n - 1 : n - 1 + m]
    return (np.rint(window).astype(np.int64) & 1).astype(np.uint8)


def _fast_length(target: int) -> int:
    """The smallest 2^a 3^b 5^c >= target: FFT sizes numpy's pocketfft does fastest."""
    best = 1 << max(0, (target - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < target:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def toeplitz_reference(bits: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """The definition, O(n m): for tests of `toeplitz_hash` only."""
    n = bits.size
    matrix = np.array([[seed[i - j + n - 1] for j in range(n)] for i in range(m)], dtype=np.int64)
    return ((matrix @ bits.astype(np.int64)) & 1).astype(np.uint8)


def verification_tag(bits: np.ndarray, rng: np.random.Generator, m: int = 64) -> np.ndarray:
    """Draw a fresh public seed from `rng` and hash; both sides call it with the same rng state."""
    seed = rng.integers(0, 2, bits.size + m - 1, dtype=np.uint8)
    return toeplitz_hash(bits, seed, m)
