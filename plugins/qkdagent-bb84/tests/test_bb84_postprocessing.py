"""Verification catches residual errors; privacy amplification has the formula's length."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdagent_bb84 import engine
from qkdagent_bb84.cascade import CascadeResult
from qkdagent_bb84.channel import Channel
from qkdagent_bb84.engine import ABORT_LENGTH, ABORT_VERIFY, OK, Settings, post_process, run_block
from qkdagent_bb84.finitekey import (
    DecoyBounds,
    asymptotic_fraction,
    h,
    lim_length,
    tomamichel_length,
    tomamichel_mu,
)
from qkdagent_bb84.hashing import toeplitz_hash, toeplitz_reference, verification_tag
from qkdagent_bb84.physics import Physics

SMALL = Settings(physics=Physics(decoys=False), block_bits=8_000, chunk_pulses=1 << 17)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (5, 3), (64, 64), (300, 17), (257, 1000)])
def test_fft_toeplitz_equals_the_definition(n: int, m: int) -> None:
    rng = np.random.default_rng(n * m)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    assert np.array_equal(toeplitz_hash(bits, seed, m), toeplitz_reference(bits, seed, m))


def test_a_single_flipped_bit_changes_the_tag() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, 10_000, dtype=np.uint8)
    for trial in range(50):
        other = bits.copy()
        other[rng.integers(0, bits.size)] ^= 1
        tags = [verification_tag(b, np.random.default_rng(trial)) for b in (bits, other)]
        assert not np.array_equal(*tags)


def test_verification_discards_a_block_with_a_residual_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = engine.cascade

    def leaves_one_error(alice, bob, qber, algorithm, channel):  # type: ignore[no-untyped-def]
        result = real(alice, bob, qber, algorithm, channel)
        result.key[123] ^= 1  # a residual error Cascade did not see
        return CascadeResult(result.key, result.disclosed, result.rounds, result.flipped)

    det = engine.gather(SMALL, np.random.default_rng(4))
    key = b"k" * 32
    ok = post_process(SMALL, det, np.random.default_rng(5), Channel.shared(key))
    assert ok.status == OK
    monkeypatch.setattr(engine, "cascade", leaves_one_error)
    result = post_process(SMALL, det, np.random.default_rng(5), Channel.shared(key))
    assert result.status == ABORT_VERIFY
    assert result.alice_key == result.bob_key == b""


def test_tomamichel_length_at_a_known_point() -> None:
    # n = 10^5, k = 10^4, Q = 2 %, leak 15000, eps_sec 1e-10, eps_cor 1e-15, by hand:
    mu = math.sqrt((1.1e5 / 1e9) * (10_001 / 10_000) * math.log(4e10))
    assert tomamichel_mu(100_000, 10_000, 1e-10) == pytest.approx(mu)
    by_hand = 1e5 * (1 - h(0.02 + mu)) - 15_000 - math.log2(2 / (1e-20 * 1e-15))
    assert tomamichel_length(100_000, 10_000, 0.02, 15_000, 1e-10, 1e-15) == math.floor(by_hand)
    assert 40_000 < by_hand < 60_000
    assert tomamichel_length(100, 10, 0.02, 0, 1e-10, 1e-15) == 0  # too short: nothing


def test_lim_length_at_a_known_point() -> None:
    bounds = DecoyBounds(s0=1_000, s1=500_000, s1_test=50_000, v1_test=2_500, phi=0.06)
    by_hand = 1_000 + 500_000 * (1 - h(0.06)) - 60_000 - 6 * math.log2(21e10) - math.log2(2e15)
    assert lim_length(bounds, 60_000, 1e-10, 1e-15) == math.floor(by_hand)


def test_asymptotic_fraction() -> None:
    assert asymptotic_fraction(0) == 1
    assert asymptotic_fraction(0.11) < 0.001  # the Shor-Preskill threshold
    assert asymptotic_fraction(0.02) == pytest.approx(1 - 2 * h(0.02))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pa_output_length_matches_the_formula(seed: int) -> None:
    result = run_block(SMALL, seed)
    assert result.status == OK
    leak = result.disclosed + SMALL.verify_bits
    ell = tomamichel_length(
        result.sifted, result.sample, result.qber_estimate, leak, SMALL.eps_sec, SMALL.eps_cor
    )
    assert result.key_bits == ell - ell % 8 > 0
    assert len(result.alice_key) * 8 == result.key_bits
    assert result.alice_key == result.bob_key


def test_a_thousand_blocks_agree_at_several_settings() -> None:
    """Both ends' final keys are identical in every one of 1,000 blocks over three links."""
    total = keys = 0
    for phys, blocks in (
        (Physics(decoys=False, distance_km=0), 400),
        (Physics(decoys=False, distance_km=40, misalignment=0.02), 300),
        (Physics(decoys=False, dark_count=2e-5, distance_km=60), 300),
    ):
        settings = Settings(physics=phys, block_bits=6_000, chunk_pulses=1 << 15)
        for seed in range(blocks):
            result = run_block(settings, (1000, seed), b"k" * 32)
            assert result.alice_key == result.bob_key, (phys, seed)
            # a discarded frame or a block too short for key is fine; any other status is not
            assert result.status in (OK, ABORT_VERIFY, ABORT_LENGTH), result.status
            total += 1
            keys += result.ok and len(result.alice_key) > 0
    assert total == 1_000
    assert keys >= 990, keys  # a few frames fail verification: discarded, never passed on
