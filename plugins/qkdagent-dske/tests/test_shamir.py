"""Shamir in dske-python's layout (REFERENCE §7.1): known answers, the digest, lying shares.

The known answers come from a second, deliberately different implementation below (field
multiplication by shift-and-add, inverses by exponentiation, no tables), built only from
REFERENCE's description: GF(2^8) with polynomial 0x11B, the secret at x = 255, the digest share
HMAC-SHA256(R, secret)[:4] || R at x = 254, k - 2 random shares at x = 0.., the rest
interpolated, share_index = x. The pinned hex then catches any drift of either.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qkdagent_dske import shamir


def gf_mul(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return out


def gf_inv(a: int) -> int:
    out = 1
    for _ in range(254):  # a^254 = a^-1 in GF(2^8)
        out = gf_mul(out, a)
    return out


def slow_interpolate(points: list[tuple[int, bytes]], x: int) -> bytes:
    out = bytearray(len(points[0][1]))
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = gf_mul(num, x ^ xj)
                den = gf_mul(den, xi ^ xj)
        coeff = gf_mul(num, gf_inv(den))
        for pos, byte in enumerate(yi):
            out[pos] ^= gf_mul(byte, coeff)
    return bytes(out)


class Stream:
    """A fixed random stream: SHAKE-256 of a label, consumed in order."""

    def __init__(self, label: bytes) -> None:
        self.data = hashlib.shake_256(label).digest(4096)
        self.pos = 0

    def __call__(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def slow_split(secret: bytes, k: int, n: int, random: Stream) -> list[tuple[int, bytes]]:
    randoms = [(x, random(len(secret))) for x in range(k - 2)]
    r = random(len(secret) - 4)
    digest = hmac.new(r, secret, hashlib.sha256).digest()[:4]
    base = [*randoms, (254, digest + r), (255, secret)]
    return randoms + [(x, slow_interpolate(base, x)) for x in range(k - 2, n)]


SECRET = bytes(range(32))

VECTOR_3_OF_5 = [
    (0, "36847d4d3d33cbe6b4249f65ca5b4b67a4ddbf535d1f021d3ab7dce787ca7fba"),
    (1, "8e1eb2efa6d404ad0c1e334f5e031e27405a16b97bbff949fcf147d151a49a49"),
    (2, "a69072669e38d65cde7b4ebc90d61c6d1d4d531aa2b9b0eb4e72e224441162ea"),
    (3, "1e0abdc405df19176641e296048e492df9cafaf084194bbf88347912927f8719"),
    (4, "cc407dd06e70a739643658cec1ae3c6d7ec4deef42911a897319ecf0d17b5898"),
]
"""Secret bytes 00..1f split 3-of-5 with the random stream SHAKE-256(b"dske-vector-3-of-5")."""


def test_field_tables_match_the_aes_field() -> None:
    assert shamir.EXP[0] == 1 and shamir.EXP[1] == 3 and shamir.EXP[2] == 5
    assert gf_mul(0x53, 0xCA) == 1  # FIPS-197's worked inverse pair
    assert gf_mul(0x57, 0x83) == 0xC1  # FIPS-197 §4.2 example
    for a in range(1, 256):
        for b in (1, 2, 3, 0x53, 0xFF):
            expected = shamir.EXP[(shamir.LOG[a] + shamir.LOG[b]) % 255]
            assert gf_mul(a, b) == expected
    assert sorted(shamir.EXP) == list(range(1, 256))  # 3 generates the whole group


@pytest.mark.parametrize(("k", "n"), [(2, 2), (2, 3), (3, 5), (5, 8), (16, 16)])
def test_split_matches_the_independent_implementation(k: int, n: int) -> None:
    label = b"dske-vector-%d-of-%d" % (k, n)
    ours = shamir.split(SECRET, k, n, Stream(label))
    theirs = slow_split(SECRET, k, n, Stream(label))
    assert ours == theirs
    assert [x for x, _ in ours] == list(range(n))  # share_index = x = 0..n-1


def test_pinned_vector_3_of_5() -> None:
    """Byte-exact shares for a fixed random stream (the interop vector in the README)."""
    shares = shamir.split(SECRET, 3, 5, Stream(b"dske-vector-3-of-5"))
    assert [(x, v.hex()) for x, v in shares] == VECTOR_3_OF_5
    # The digest share the layout puts at x = 254: HMAC-SHA256(R, secret)[:4] || R.
    r = Stream(b"dske-vector-3-of-5")
    r(32)  # the one random share at x = 0
    random_part = r(28)
    digest_share = shamir.interpolate(shares[:3], 254)
    assert digest_share[4:] == random_part
    assert digest_share[:4] == hmac.new(random_part, SECRET, hashlib.sha256).digest()[:4]
    assert shares[0][1] == Stream(b"dske-vector-3-of-5")(32)  # x = 0 is the random share
    assert shamir.interpolate(shares[2:5], 255) == SECRET


@pytest.mark.parametrize(("k", "n"), [(2, 3), (3, 5), (4, 7)])
def test_any_k_shares_recover_the_secret(k: int, n: int) -> None:
    shares = shamir.split(SECRET, k, n)
    for subset in itertools.combinations(shares, k):
        assert shamir.recover(subset) == SECRET


def test_a_wrong_share_breaks_the_digest() -> None:
    shares = shamir.split(SECRET, 3, 5)
    x, value = shares[1]
    lying = [shares[0], (x, bytes([value[0] ^ 1]) + value[1:]), shares[2]]
    with pytest.raises(shamir.ShamirError, match="digest"):
        shamir.recover(lying)


def test_robust_recovery_names_the_liar() -> None:
    shares = shamir.split(SECRET, 3, 5)
    x, value = shares[0]
    shares[0] = (x, bytes(len(value)))  # the first hub lies (all zeros)
    secret, liars = shamir.recover_robust(shares, 3)
    assert secret == SECRET and liars == [0]


def test_too_few_consistent_shares_is_an_error() -> None:
    shares = shamir.split(SECRET, 3, 5)
    shares = [(x, bytes(v[0] ^ 0xFF for _ in v)) if x < 3 else (x, v) for x, v in shares]
    with pytest.raises(shamir.ShamirError, match="agree"):
        shamir.recover_robust(shares, 3)
    with pytest.raises(shamir.ShamirError, match="needed"):
        shamir.recover_robust(shares[:2], 3)


@pytest.mark.parametrize(("k", "n", "size"), [(1, 3, 32), (3, 2, 32), (2, 17, 32), (2, 3, 4)])
def test_bad_parameters_are_refused(k: int, n: int, size: int) -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.split(bytes(size), k, n)


def test_malformed_share_sets_are_refused() -> None:
    with pytest.raises(shamir.ShamirError, match="same index"):
        shamir.interpolate([(1, b"ab"), (1, b"cd")], 255)
    with pytest.raises(shamir.ShamirError, match="length"):
        shamir.interpolate([(1, b"ab"), (2, b"c")], 255)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=5, max_size=64),
    k=st.integers(2, 6),
    extra=st.integers(0, 4),
    data=st.data(),
)
def test_split_then_recover_any_subset(
    secret: bytes, k: int, extra: int, data: st.DataObject
) -> None:
    n = k + extra
    shares = shamir.split(secret, k, n)
    subset = data.draw(st.permutations(shares)).copy()[:k]
    assert shamir.recover(subset) == secret
