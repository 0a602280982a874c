"""The quantum phase of BB84, simulated classically and vectorised with numpy.

Model (the standard one of GLLP / Ma et al. 2005 decoy-state papers): Alice sends phase-randomised
weak coherent pulses whose photon number is Poissonian with mean `mu` (signal), `decoy_mu` (weak
decoy) or 0 (vacuum decoy); the fibre has transmittance 10^(-loss*L/10); Bob's two detectors have
efficiency `detector_efficiency` and a dark-count probability `dark_count` per gate each; a
detected pulse lands in the wrong detector with probability `misalignment`; a double click is
given a random bit (squashing). After-pulsing and dead time are not simulated.

Speed: a pulse that Bob does not detect contributes nothing to any later step, so the per-pulse
work is two float32 draws (intensity class and click); bits and bases are drawn only for the
detected pulses. That is statistically identical to drawing them for every pulse. Eve's
photon-number-splitting attack needs each pulse's photon number, which costs one Poisson draw
per pulse on that path only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIGNAL, DECOY, VACUUM = 0, 1, 2
KEY_BASIS, TEST_BASIS = 0, 1


@dataclass(frozen=True)
class Physics:
    """The simulated link: source, fibre, detectors and (optionally) Eve."""

    mu: float = 0.5
    decoy_mu: float = 0.1
    decoys: bool = True
    p_signal: float = 0.6
    p_decoy: float = 0.25
    """Probabilities of the signal and weak-decoy intensities; the vacuum decoy has the rest."""
    p_key_basis: float = 0.7
    """Each side picks the key basis with this probability, the test basis otherwise."""
    fibre_loss_db_km: float = 0.2
    distance_km: float = 25.0
    detector_efficiency: float = 0.2
    dark_count: float = 1e-6
    misalignment: float = 0.01
    eve_intercept: float = 0.0
    """Fraction of pulses Eve measures in a random basis and resends (intercept-resend)."""
    eve_pns: bool = False
    """Photon-number splitting: Eve keeps a photon of every multi-photon pulse, forwards the
    rest losslessly and blocks single-photon pulses to keep the signal gain unchanged."""

    def __post_init__(self) -> None:
        checks = {
            "mu": 0 < self.mu <= 10,
            "decoy_mu": 0 <= self.decoy_mu < self.mu,
            "p_signal": 0 < self.p_signal <= 1,
            "p_decoy": 0 <= self.p_decoy and self.p_signal + self.p_decoy <= 1,
            "p_key_basis": 0 < self.p_key_basis < 1,
            "fibre_loss_db_km": 0 <= self.fibre_loss_db_km <= 10,
            "distance_km": 0 <= self.distance_km <= 1000,
            "detector_efficiency": 0 < self.detector_efficiency <= 1,
            "dark_count": 0 <= self.dark_count < 0.5,
            "misalignment": 0 <= self.misalignment <= 0.5,
            "eve_intercept": 0 <= self.eve_intercept <= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"physics parameter out of range: {', '.join(bad)}")

    @property
    def transmittance(self) -> float:
        """Fibre times detector: the probability that one photon is detected."""
        fibre = 10 ** (-self.fibre_loss_db_km * self.distance_km / 10)
        return fibre * self.detector_efficiency

    @property
    def intensities(self) -> tuple[float, float, float]:
        return (self.mu, self.decoy_mu, 0.0)

    @property
    def class_probabilities(self) -> tuple[float, float, float]:
        if not self.decoys:
            return (1.0, 0.0, 0.0)
        return (self.p_signal, self.p_decoy, 1.0 - self.p_signal - self.p_decoy)


@dataclass
class Detections:
    """What survives the quantum phase: one entry per pulse Bob registered a click for."""

    cls: np.ndarray  # uint8 intensity class
    a_bit: np.ndarray  # uint8
    a_basis: np.ndarray  # uint8
    b_basis: np.ndarray  # uint8
    b_bit: np.ndarray  # uint8
    sent: np.ndarray  # int64[3]: pulses sent per intensity class
    pulses: int

    @classmethod
    def concat(cls, parts: list[Detections]) -> Detections:
        arrays = {f: np.concatenate([getattr(p, f) for p in parts]) for f in _ARRAYS}
        return cls(
            **arrays,
            sent=np.sum([p.sent for p in parts], axis=0),
            pulses=sum(p.pulses for p in parts),
        )


_ARRAYS = ("cls", "a_bit", "a_basis", "b_basis", "b_bit")


def _bits(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, n, dtype=np.uint8)


def _basis(rng: np.random.Generator, n: int, p_key: float) -> np.ndarray:
    return (rng.random(n, dtype=np.float32) >= p_key).astype(np.uint8)


def _pns_block_fraction(phys: Physics) -> float:
    """Fraction of single-photon signal pulses Eve blocks so the signal gain looks honest."""
    eta, eta_d, mu = phys.transmittance, phys.detector_efficiency, phys.mu
    honest = 1 - math.exp(-eta * mu)
    # multi-photon pulses forwarded losslessly with one photon fewer
    p1 = mu * math.exp(-mu)
    multi = 0.0
    term = p1
    for n in range(2, 60):
        term = term * mu / n
        multi += term * (1 - (1 - eta_d) ** (n - 1))
    if p1 * eta_d <= 0:
        return 1.0
    return min(1.0, max(0.0, 1 - (honest - multi) / (p1 * eta_d)))


def simulate(phys: Physics, pulses: int, rng: np.random.Generator) -> Detections:
    """Send `pulses` pulses through the link; return the detected ones (pure given `rng`)."""
    probs = phys.class_probabilities
    if phys.decoys:
        u = rng.random(pulses, dtype=np.float32)
        cls = (u >= probs[0]).astype(np.uint8) + (u >= probs[0] + probs[1])
    else:
        cls = np.zeros(pulses, dtype=np.uint8)
    sent = np.bincount(cls, minlength=3).astype(np.int64)
    intensities = np.asarray(phys.intensities)
    if phys.eve_pns:
        photons = rng.poisson(intensities[cls])
        b = _pns_block_fraction(phys)
        eta_d = phys.detector_efficiency
        p_click = np.where(
            photons >= 2,
            1 - (1 - eta_d) ** np.maximum(photons - 1, 0),
            np.where(photons == 1, (1 - b) * eta_d, 0.0),
        )
        signal = rng.random(pulses) < p_click
    else:
        p_class = (1 - np.exp(-phys.transmittance * intensities)).astype(np.float32)
        signal = rng.random(pulses, dtype=np.float32) < p_class[cls]
    detected = signal.copy()
    darks = []
    for _ in range(2):
        count = rng.binomial(pulses, phys.dark_count) if phys.dark_count else 0
        where = rng.integers(0, pulses, count)
        detected[where] = True
        darks.append(where)
    idx = np.flatnonzero(detected)
    m = idx.size
    dark = [np.zeros(m, dtype=bool) for _ in range(2)]
    for mask, where in zip(dark, darks, strict=True):
        mask[np.searchsorted(idx, where)] = True  # every dark count is in idx
    sig = signal[idx]
    a_bit = _bits(rng, m)
    a_basis = _basis(rng, m, phys.p_key_basis)
    b_basis = _basis(rng, m, phys.p_key_basis)
    state_basis, state_bit = a_basis, a_bit
    if phys.eve_intercept > 0:
        eve = rng.random(m) < phys.eve_intercept
        eve_basis = _bits(rng, m)
        eve_bit = np.where(eve_basis == a_basis, a_bit, _bits(rng, m))
        state_basis = np.where(eve, eve_basis, a_basis)
        state_bit = np.where(eve, eve_bit, a_bit)
    flip = rng.random(m) < phys.misalignment
    outcome = np.where(b_basis == state_basis, state_bit ^ flip, _bits(rng, m))
    click0 = (sig & (outcome == 0)) | dark[0]
    click1 = (sig & (outcome == 1)) | dark[1]
    b_bit = np.where(click0 & click1, _bits(rng, m), click1).astype(np.uint8)
    return Detections(cls[idx], a_bit, a_basis, b_basis, b_bit, sent, pulses)
