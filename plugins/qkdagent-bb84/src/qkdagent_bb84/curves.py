"""Expected secret key rates of a simulated link (pure): the curves a sweep is plotted against.

From the link's physics alone, per pulse sent:

- `expected`: gain and error rate per intensity class, the model `physics.simulate` samples
  (dark counts of two detectors give a random bit; intercept-resend adds 1/4 - e_d/2 on the
  pulses Eve touches).
- `asymptotic_rate`: decoy BB84 with infinitely many decoys and infinitely long keys
  (H.-K. Lo, X. Ma, K. Chen, PRL 94, 230504 (2005); GLLP):
  R = q_s [Q0 + Q1 (1 - h(e1)) - f Q_mu h(E_mu)], key from the signal intensity, q_s its
  share of key-basis pulses; without decoys (an ideal single-photon source, as the engine then
  assumes) R = q [Q (1 - h(E) - f h(E))].
- `finite_rate`: the same finite-key formula the engine applies to a block (Lim et al. 2014
  with decoys, Tomamichel et al. 2012 without), evaluated at the expected counts of a block of
  `block_bits` sifted key bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .finitekey import decoy_bounds, h, lim_length, tomamichel_length
from .physics import Physics

VERIFY_BITS = 64


@dataclass(frozen=True)
class ClassFigures:
    gain: tuple[float, float, float]
    """Probability of a detection per pulse, per intensity class (signal, decoy, vacuum)."""
    error: tuple[float, float, float]
    """Error rate of those detections (in matching bases)."""
    y0: float
    y1: float
    e1: float


def _signal_error(phys: Physics) -> float:
    eve = phys.eve_intercept
    return (1 - eve) * phys.misalignment + eve * (phys.misalignment / 2 + 0.25)


def expected(phys: Physics) -> ClassFigures:
    eta = phys.transmittance
    y0 = 1 - (1 - phys.dark_count) ** 2
    e_sig = _signal_error(phys)
    gains, errors = [], []
    for mu in phys.intensities:
        signal = 1 - math.exp(-eta * mu)
        gain = 1 - (1 - y0) * (1 - signal)
        gains.append(gain)
        errors.append((0.5 * y0 + e_sig * signal) / gain if gain > 0 else 0.5)
    y1 = 1 - (1 - y0) * (1 - eta)
    e1 = (0.5 * y0 + e_sig * eta) / y1 if y1 > 0 else 0.5
    return ClassFigures(
        (gains[0], gains[1], gains[2]), (errors[0], errors[1], errors[2]), y0, y1, e1
    )


def asymptotic_rate(phys: Physics, f: float = 1.16) -> float:
    """Secret bits per pulse sent, infinite keys and decoys (0 when nothing is left)."""
    fig = expected(phys)
    q = phys.p_key_basis**2
    mu = phys.mu
    gain, error = fig.gain[0], fig.error[0]
    if not phys.decoys:
        return max(0.0, q * gain * (1 - h(error) - f * h(error)))
    q0 = fig.y0 * math.exp(-mu)
    q1 = fig.y1 * mu * math.exp(-mu)
    rate = q0 + q1 * (1 - h(fig.e1)) - f * gain * h(error)
    return max(0.0, q * phys.class_probabilities[0] * rate)


def finite_rate(
    phys: Physics, block_bits: int, f: float = 1.16, eps_sec: float = 1e-10, eps_cor: float = 1e-15
) -> float:
    """Secret bits per pulse of a block of `block_bits` sifted key bits at the expected counts."""
    fig = expected(phys)
    probs = phys.class_probabilities
    kb = phys.p_key_basis
    per_pulse = sum(p * g for p, g in zip(probs, fig.gain, strict=True))
    if per_pulse <= 0:
        return 0.0
    pulses = block_bits / (kb**2 * per_pulse)
    key = [pulses * kb**2 * p * g for p, g in zip(probs, fig.gain, strict=True)]
    test = [pulses * (1 - kb) ** 2 * p * g for p, g in zip(probs, fig.gain, strict=True)]
    errors = [t * e for t, e in zip(test, fig.error, strict=True)]
    qber = sum(errors) / sum(test)
    leak = f * block_bits * h(qber) + VERIFY_BITS
    if phys.decoys:
        bounds = decoy_bounds(key, test, errors, phys.intensities, probs, eps_sec)  # type: ignore[arg-type]
        ell = lim_length(bounds, leak, eps_sec, eps_cor)
    else:
        ell = tomamichel_length(block_bits, round(sum(test)), qber, leak, eps_sec, eps_cor)
    return ell / pulses
