"""Shamir secret sharing over GF(2^8), in dske-python's exact layout (REFERENCE §7.1).

Hand-written rather than taken from a library on purpose: interop needs dske-python's layout
byte for byte (the secret at x = 255, a digest share at x = 254, k - 2 random shares at
x = 0..k-3 and the rest interpolated at x = k-2..n-1, field polynomial 0x11B, generator 3).
The general-purpose libraries use other fields or layouts (PyCryptodome: GF(2^128) 16-byte
blocks; `secretsharing`: prime fields) and none of them has the digest share, which is what lets
a responder tell a lying hub from an honest one. The layout is SLIP-0039's, whose reference
code is internal API and draws randomness from a module global; here the random stream is a
parameter so the known-answer tests can fix it.

Pure: no I/O. Errors are `ShamirError` (a share set that is inconsistent or malformed).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import os
from collections.abc import Callable, Sequence

SECRET_INDEX = 255
DIGEST_INDEX = 254
DIGEST_LENGTH = 4
MAX_SHARES = 16
MIN_SECRET = DIGEST_LENGTH + 1
MAX_COMBINATIONS = 4096
"""Subsets tried when looking for a consistent one (n ≤ 16 and few liars need far fewer)."""

Share = tuple[int, bytes]
RandomBytes = Callable[[int], bytes]


class ShamirError(ValueError):
    """The shares do not reconstruct a secret whose digest checks out (or are malformed)."""


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 255
    log = [0] * 256
    value = 1
    for power in range(255):
        exp[power] = value
        log[value] = power
        value ^= value << 1  # multiply by the generator 3 = x + 1
        if value & 0x100:
            value ^= 0x11B
    return exp, log


EXP, LOG = _tables()


def _digest(random_part: bytes, secret: bytes) -> bytes:
    return hmac.new(random_part, secret, hashlib.sha256).digest()[:DIGEST_LENGTH]


def interpolate(shares: Sequence[Share], x: int) -> bytes:
    """The value at `x` of the polynomial through `shares` (Lagrange over GF(2^8))."""
    xs = [index for index, _ in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError("two shares have the same index")
    lengths = {len(value) for _, value in shares}
    if len(lengths) != 1:
        raise ShamirError("shares differ in length")
    for index, value in shares:
        if index == x:
            return value
    (length,) = lengths
    log_product = sum(LOG[index ^ x] for index in xs)
    result = 0
    for index, value in shares:
        denominator = sum(LOG[index ^ other] for other in xs if other != index)
        basis = (log_product - LOG[index ^ x] - denominator) % 255
        # every byte times the Lagrange coefficient at once: a 256-byte table per coefficient
        result ^= int.from_bytes(value.translate(_times(basis)), "big")
    return result.to_bytes(length, "big")


@functools.cache
def _times(log_factor: int) -> bytes:
    """The table of b * EXP[log_factor] over GF(2^8), for `bytes.translate`."""
    return bytes([0, *(EXP[(LOG[b] + log_factor) % 255] for b in range(1, 256))])


def split(
    secret: bytes, threshold: int, count: int, random_bytes: RandomBytes = os.urandom
) -> list[Share]:
    """`count` shares of which any `threshold` rebuild `secret`; index = x = `share_index`."""
    if not 2 <= threshold <= count <= MAX_SHARES:
        raise ShamirError(f"need 2 <= k <= n <= {MAX_SHARES}")
    if len(secret) < MIN_SECRET:
        raise ShamirError(f"a secret needs at least {MIN_SECRET} bytes")
    random_count = threshold - 2
    shares: list[Share] = [(x, random_bytes(len(secret))) for x in range(random_count)]
    random_part = random_bytes(len(secret) - DIGEST_LENGTH)
    base = [
        *shares,
        (DIGEST_INDEX, _digest(random_part, secret) + random_part),
        (SECRET_INDEX, secret),
    ]
    shares.extend((x, interpolate(base, x)) for x in range(random_count, count))
    return shares


def recover(shares: Sequence[Share]) -> bytes:
    """The secret from exactly k shares, checked against the digest share."""
    secret = interpolate(shares, SECRET_INDEX)
    digest_share = interpolate(shares, DIGEST_INDEX)
    expected = _digest(digest_share[DIGEST_LENGTH:], secret)
    if not hmac.compare_digest(digest_share[:DIGEST_LENGTH], expected):
        raise ShamirError("the shares' digest does not match: at least one share is wrong")
    return secret


def recover_robust(shares: Sequence[Share], threshold: int) -> tuple[bytes, list[int]]:
    """The secret from any `threshold` consistent shares, and the indices of shares that
    disagree with it (a lying hub). Tries the first `threshold` shares, then other subsets."""
    if threshold < 2 or len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed")
    for tried, subset in enumerate(itertools.combinations(shares, threshold)):
        if tried >= MAX_COMBINATIONS:
            break
        try:
            secret = recover(subset)
        except ShamirError:
            continue
        liars = [x for x, value in shares if not hmac.compare_digest(interpolate(subset, x), value)]
        return secret, liars
    raise ShamirError(f"no {threshold} of the {len(shares)} shares agree on a secret")
