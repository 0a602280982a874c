"""Quantum phase, sifting and parameter estimation against the configured physics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdagent_bb84.engine import ABORT_QBER, Settings, estimate, gather, run_block, sift
from qkdagent_bb84.physics import Physics, simulate


def hoeffding(k: int, eps: float = 1e-6) -> float:
    """Two-sided deviation of a k-sample mean that fails with probability at most eps."""
    return math.sqrt(math.log(2 / eps) / (2 * k))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("qber", [0.01, 0.03, 0.08])
def test_qber_estimate_within_the_statistical_bound(seed: int, qber: float) -> None:
    # no dark counts: the only errors are misalignment, so the true QBER is the configured one
    phys = Physics(misalignment=qber, dark_count=0, decoys=False, p_key_basis=0.5)
    settings = Settings(physics=phys, block_bits=20_000, chunk_pulses=1 << 18)
    est = estimate(sift(gather(settings, np.random.default_rng(seed))))
    assert est.sample > 10_000
    assert abs(est.qber - qber) <= hoeffding(est.sample)


def test_full_intercept_resend_gives_a_quarter_errors_and_aborts_with_no_key() -> None:
    phys = Physics(eve_intercept=1.0, misalignment=0, dark_count=0, decoys=False)
    result = run_block(Settings(physics=phys, block_bits=10_000, chunk_pulses=1 << 18), 7)
    assert result.status == ABORT_QBER
    assert abs(result.qber_estimate - 0.25) <= hoeffding(result.sample)
    assert result.alice_key == result.bob_key == b""
    assert result.key_bits == 0


def test_partial_intercept_resend_scales_the_qber() -> None:
    phys = Physics(eve_intercept=0.2, misalignment=0, dark_count=0, decoys=False, p_key_basis=0.5)
    settings = Settings(physics=phys, block_bits=20_000, chunk_pulses=1 << 18)
    est = estimate(sift(gather(settings, np.random.default_rng(3))))
    assert abs(est.qber - 0.05) <= hoeffding(est.sample)


def test_gain_follows_the_fibre_loss() -> None:
    for km in (0, 50):
        phys = Physics(distance_km=km, dark_count=0, decoys=False)
        det = simulate(phys, 1 << 20, np.random.default_rng(km))
        expected = 1 - math.exp(-phys.transmittance * phys.mu)
        assert abs(det.cls.size / det.pulses - expected) <= hoeffding(det.pulses)


def test_pns_keeps_the_signal_gain_and_betrays_itself_in_the_decoy_gain() -> None:
    honest = simulate(Physics(dark_count=0), 1 << 20, np.random.default_rng(1))
    eve = simulate(Physics(dark_count=0, eve_pns=True), 1 << 20, np.random.default_rng(1))

    def gains(d):  # type: ignore[no-untyped-def]
        return np.bincount(d.cls, minlength=3)[:2] / d.sent[:2]

    h, e = gains(honest), gains(eve)
    assert abs(e[0] - h[0]) < 0.05 * h[0]  # Eve matches the signal gain ...
    assert e[1] < 0.8 * h[1]  # ... but cannot match the decoy's


def test_same_seed_same_block_other_seed_other_block() -> None:
    settings = Settings(physics=Physics(decoys=False), block_bits=5_000, chunk_pulses=1 << 17)
    a, b, c = run_block(settings, 11), run_block(settings, 11), run_block(settings, 12)
    assert a.ok and a.alice_key == b.alice_key and a.disclosed == b.disclosed
    assert c.alice_key != a.alice_key


def test_bad_physics_is_refused() -> None:
    with pytest.raises(ValueError, match="decoy_mu"):
        Physics(mu=0.1, decoy_mu=0.2)
