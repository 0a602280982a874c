"""Cascade: corrects every error at low QBER, and counts every parity it discloses."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdagent_bb84.cascade import ALGORITHMS, CascadeResult, block_sizes, cascade, cascade_frames
from qkdagent_bb84.finitekey import h
from qkdagent_bb84.hashing import verification_tag


def noisy(n: int, qber: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    errors = rng.random(n) < qber
    return alice, alice ^ errors.astype(np.uint8)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("qber", [0.005, 0.02, 0.05])
def test_corrects_every_error_up_to_five_percent(algorithm: str, qber: float) -> None:
    for seed in range(8):
        alice, bob = noisy(4_000, qber, seed)
        errors = int(np.count_nonzero(alice != bob))
        result = cascade(alice, bob, qber, algorithm)
        assert np.array_equal(result.key, alice), (algorithm, qber, seed)
        assert result.flipped == errors  # each flip fixed an error, none introduced one
        # no protocol can disclose less than the Shannon bound n h(Q)
        assert result.disclosed >= 4_000 * h(errors / 4_000)


def test_an_error_free_key_discloses_exactly_the_block_parities() -> None:
    alice, _ = noisy(1_000, 0, 0)
    result = cascade(alice, alice.copy(), 0.02, "original")
    sizes = block_sizes("original", 0.02, 1_000)
    assert result.disclosed == sum(math.ceil(1_000 / k) for k in sizes)
    assert result.rounds == len(sizes)
    assert result.flipped == 0


def test_one_error_costs_one_bisection() -> None:
    alice, _ = noisy(1_024, 0, 1)
    bob = alice.copy()
    bob[500] ^= 1
    result = cascade(alice, bob, 0.02, "original")
    sizes = block_sizes("original", 0.02, 1_024)
    parities = sum(math.ceil(1_024 / k) for k in sizes)
    # one bisection in pass 1 (k1 = 37: 5 or 6 halvings by where the error sits), none later
    steps = result.disclosed - parities
    assert math.floor(math.log2(sizes[0])) <= steps <= math.ceil(math.log2(sizes[0]))
    assert result.rounds == len(sizes) + steps
    assert np.array_equal(result.key, alice)


def test_efficiency_of_the_efficient_variant() -> None:
    alice, bob = noisy(50_000, 0.02, 5)
    q = float(np.mean(alice != bob))
    f_orig = cascade(alice, bob, q, "original").efficiency(50_000, q)
    f_yan = cascade(alice, bob, q, "yanetal").efficiency(50_000, q)
    assert f_yan < f_orig
    assert 1.0 < f_yan < 1.12


def test_inputs_are_not_modified_and_lengths_must_match() -> None:
    alice, bob = noisy(500, 0.03, 2)
    before = bob.copy()
    cascade(alice, bob, 0.03)
    assert np.array_equal(bob, before)
    with pytest.raises(ValueError):
        cascade(alice, bob[:-1], 0.03)
    with pytest.raises(ValueError):
        block_sizes("bogus", 0.03, 10)


def test_result_repr_hides_the_key() -> None:
    """Reconciled key bits are secret: a logged or traced result must not show them."""
    key = np.ones(64, dtype=np.uint8)
    shown = repr(CascadeResult(key=key, disclosed=3, rounds=2, flipped=1))
    assert "disclosed=3" in shown
    assert "key=" not in shown and "array" not in shown


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=64, max_value=3_000),
    rate=st.floats(min_value=0.0, max_value=0.11),
    assumed=st.floats(min_value=0.001, max_value=0.11),
    algorithm=st.sampled_from(ALGORITHMS),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_error_pattern_is_corrected_or_caught_by_verification(
    n: int, rate: float, assumed: float, algorithm: str, seed: int
) -> None:
    """Below the abort threshold, whatever the errors and however wrong the QBER estimate:
    Cascade's key equals Alice's, or the verification tag differs (the block is discarded).
    Never a silent mismatch."""
    rng = np.random.default_rng(seed)
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    bob = alice ^ (rng.random(n) < rate).astype(np.uint8)
    result = cascade(alice, bob, assumed, algorithm)
    tags = [verification_tag(k, np.random.default_rng(seed)) for k in (alice, result.key)]
    corrected = np.array_equal(result.key, alice)
    assert corrected or not np.array_equal(*tags)
    assert result.flipped >= 0 and result.disclosed >= math.ceil(
        n / block_sizes(algorithm, assumed, n)[0]
    )


def test_frames_reconciled_together_match_frames_reconciled_alone() -> None:
    """Batching frames shares round trips, never changes a frame's outcome or its parity count."""
    alice = np.stack([noisy(2_000, 0.03, s)[0] for s in range(5)])
    bob = np.stack([noisy(2_000, 0.03, s)[1] for s in range(5)])
    batch = cascade_frames(alice, bob, 0.03)
    for i in range(5):
        alone = cascade(alice[i], bob[i], 0.03)
        assert np.array_equal(batch.keys[i], alone.key)
        assert batch.disclosed[i] == alone.disclosed and batch.flipped[i] == alone.flipped
    assert batch.rounds < sum(cascade(alice[i], bob[i], 0.03).rounds for i in range(5))
