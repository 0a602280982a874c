"""Secret key length bounds: asymptotic, Tomamichel et al. 2012, Lim et al. 2014 (pure functions).

- `tomamichel_length`: M. Tomamichel, C. C. W. Lim, N. Gisin, R. Renner, "Tight finite-key
  analysis for quantum cryptography", Nat. Commun. 3, 634 (2012), Eq. (2), for BB84 with a
  single-photon source (q = 1):
      l = floor( n (1 - h(Q + mu)) - leak_EC - log2(2 / (eps_sec^2 eps_cor)) ),
      mu = sqrt( (n + k)/(n k) * (k + 1)/k * ln(4 / eps_sec) ).
  (The supplementary's ln(4/eps_sec), slightly more conservative than the main text's ln(2/.).)
- `lim_length`: C. C. W. Lim, M. Curty, N. Walenta, F. Xu, H. Zbinden, "Concise security bounds
  for practical decoy-state quantum key distribution", Phys. Rev. A 89, 022307 (2014), Eqs. (1)-(5),
  for decoy BB84 with intensities mu1 > mu2 + mu3, mu2 > mu3 >= 0 (signal, weak, vacuum):
      l = floor( s0 + s1 (1 - h(phi)) - leak_EC - 6 log2(21/eps_sec) - log2(2/eps_cor) ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def h(p: float) -> float:
    """Binary entropy in bits; 1 at and beyond 0.5 (a bound past 0.5 leaves no secrecy)."""
    if p <= 0:
        return 0.0
    if p >= 0.5:
        return 1.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def asymptotic_fraction(qber: float) -> float:
    """Shor-Preskill secret fraction per sifted bit, 1 - 2h(Q) (ideal reconciliation)."""
    return max(0.0, 1 - 2 * h(qber))


def tomamichel_mu(n: int, k: int, eps_sec: float) -> float:
    if n <= 0 or k <= 0:
        return 0.5
    return math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(4 / eps_sec))


def tomamichel_length(
    n: int, k: int, qber: float, leak_ec: float, eps_sec: float, eps_cor: float
) -> int:
    """Key length from n key-basis bits with test-basis error rate `qber` on k test bits."""
    mu = tomamichel_mu(n, k, eps_sec)
    raw = n * (1 - h(qber + mu)) - leak_ec - math.log2(2 / (eps_sec**2 * eps_cor))
    return max(0, math.floor(raw))


@dataclass(frozen=True)
class DecoyBounds:
    """Lim et al. 2014 finite-size decoy estimates for one block."""

    s0: float  # lower bound on vacuum events in the key basis
    s1: float  # lower bound on single-photon events in the key basis
    s1_test: float  # the same in the test basis
    v1_test: float  # upper bound on single-photon errors in the test basis
    phi: float  # upper bound on the single-photon phase error rate of the key


def _tau(n: int, mus: Sequence[float], probs: Sequence[float]) -> float:
    return sum(p * math.exp(-m) * m**n / math.factorial(n) for m, p in zip(mus, probs, strict=True))


def _gamma(a: float, b: float, c: float, d: float) -> float:
    if b >= 0.5 or c <= 0 or d <= 0:
        return 0.5
    b = max(b, 1e-9)  # no observed error: the bound is still finite
    inner = (c + d) / (c * d * (1 - b) * b) * (21**2) / (a**2)
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(inner))


def _hoeffding(
    counts: Sequence[float],
    total: float,
    mus: Sequence[float],
    probs: Sequence[float],
    eps: float,
    sign: int,
) -> list[float]:
    delta = math.sqrt(total / 2 * math.log(21 / eps))
    return [
        math.exp(m) / p * (c + sign * delta) if p > 0 else 0.0
        for c, m, p in zip(counts, mus, probs, strict=True)
    ]


def _s0_s1(
    counts: Sequence[float], mus: Sequence[float], probs: Sequence[float], eps: float
) -> tuple[float, float]:
    total = float(sum(counts))
    lo = _hoeffding(counts, total, mus, probs, eps, -1)
    hi = _hoeffding(counts, total, mus, probs, eps, +1)
    m1, m2, m3 = mus
    tau0, tau1 = _tau(0, mus, probs), _tau(1, mus, probs)
    s0 = max(0.0, tau0 * (m2 * lo[2] - m3 * hi[1]) / (m2 - m3))
    num = lo[1] - hi[2] - (m2**2 - m3**2) / m1**2 * (hi[0] - s0 / tau0)
    s1 = max(0.0, tau1 * m1 * num / (m1 * (m2 - m3) - m2**2 + m3**2))
    return s0, s1


def decoy_bounds(
    key_counts: Sequence[int],
    test_counts: Sequence[int],
    test_errors: Sequence[int],
    mus: Sequence[float],
    probs: Sequence[float],
    eps_sec: float,
) -> DecoyBounds:
    """Lim et al. 2014 bounds from detections (and test-basis errors) per intensity class."""
    s0, s1 = _s0_s1(key_counts, mus, probs, eps_sec)
    _, s1z = _s0_s1(test_counts, mus, probs, eps_sec)
    total_e = float(sum(test_errors))
    e_hi = _hoeffding(test_errors, total_e, mus, probs, eps_sec, +1)
    e_lo = _hoeffding(test_errors, total_e, mus, probs, eps_sec, -1)
    tau1 = _tau(1, mus, probs)
    v1 = max(0.0, tau1 * (e_hi[1] - e_lo[2]) / (mus[1] - mus[2]))
    if s1z <= 0 or s1 <= 0:
        return DecoyBounds(s0, s1, s1z, v1, 0.5)
    ratio = min(v1 / s1z, 0.5)
    phi = min(0.5, ratio + _gamma(eps_sec, ratio, s1z, s1))
    return DecoyBounds(s0, s1, s1z, v1, phi)


def lim_length(bounds: DecoyBounds, leak_ec: float, eps_sec: float, eps_cor: float) -> int:
    raw = (
        bounds.s0
        + bounds.s1 * (1 - h(bounds.phi))
        - leak_ec
        - 6 * math.log2(21 / eps_sec)
        - math.log2(2 / eps_cor)
    )
    return max(0, math.floor(raw))
